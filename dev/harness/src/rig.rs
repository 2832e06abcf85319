//! A multi-host rig made of network namespaces: each host a namespace with one veth into a
//! bridge of its own and an address in a /24 of its own, so traffic between hosts takes real
//! addresses and routes, never loopback. Daemons run in a host through `ip netns exec` (which
//! also gives them the host's `/etc/netns/NAME/resolv.conf`); the test's own clients and
//! helpers run in a host on a thread that joined its namespace ([`Rig::spawn_in`]), so their
//! sockets are that host's. Faults: a host's link set down (packets vanish, no reset) and a
//! bandwidth cap (`tbf`; this kernel has no `netem`, so latency comes from a relay instead,
//! [`delay_relay`]). A DNS server (dnsmasq) can run on a host of its own.
//!
//! Needs root, iproute2 and (for DNS) dnsmasq; [`Rig::new`] says why when namespaces cannot be
//! made, and a test then skips with that message unless `MPSDEV_REQUIRE_NETNS` is set (CI sets
//! it, so there the rig must run). Everything is torn down on drop.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::daemon::Launch;

/// A host of the rig.
#[derive(Clone, Debug)]
pub struct Host {
    /// Its role in the test ("client", "proxy-a", "worker-1", …).
    pub role: String,
    /// The network namespace (`ip netns` name).
    pub netns: String,
    /// Its address on the rig's network.
    pub ip: Ipv4Addr,
    /// The bridge's end of its link (in the root namespace): setting it down cuts the host off.
    link: String,
}

/// The rig: hosts on one bridge, a DNS server if started.
pub struct Rig {
    tag: String,
    hosts: Vec<Host>,
    bridge: String,
    dns: Option<(Child, PathBuf)>,
}

/// Rigs made by this process (several tests build theirs at once).
static RIGS: AtomicU32 = AtomicU32::new(0);

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|err| format!("cannot run {program} ({err})"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl Rig {
    /// A rig whose hosts have the roles `roles`, each up and reachable from the others and from
    /// the test process (the bridge has an address too). `Err` says why it cannot be made.
    pub fn new(roles: &[&str]) -> Result<Rig, String> {
        let n = RIGS.fetch_add(1, Ordering::SeqCst);
        let tag = format!("mps{}x{n}", std::process::id() % 100_000);
        // 10.213.0.0/16 is this rig's: one /24 per rig of this process, by pid and count.
        let subnet = u8::try_from((std::process::id() * 7 + n) % 250 + 1).unwrap_or(1);
        let bridge = format!("{tag}b");
        let mut rig = Rig { tag: tag.clone(), hosts: Vec::new(), bridge: bridge.clone(), dns: None };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.213.{subnet}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for (index, role) in roles.iter().enumerate() {
            let host = Host {
                role: (*role).to_owned(),
                netns: format!("{tag}h{index}"),
                ip: Ipv4Addr::new(10, 213, subnet, u8::try_from(index + 2).unwrap_or(254)),
                link: format!("{tag}v{index}"),
            };
            rig.add_host(&host)?;
            rig.hosts.push(host);
        }
        Ok(rig)
    }

    fn add_host(&self, host: &Host) -> Result<(), String> {
        let inner = format!("{}i", host.link);
        ip(&["netns", "add", &host.netns])?;
        ip(&["link", "add", &host.link, "type", "veth", "peer", "name", &inner])?;
        ip(&["link", "set", &inner, "netns", &host.netns])?;
        ip(&["link", "set", &host.link, "master", &self.bridge])?;
        ip(&["link", "set", &host.link, "up"])?;
        let ns = ["-n", host.netns.as_str()];
        ip(&[&ns[..], &["addr", "add", &format!("{}/24", host.ip), "dev", &inner]].concat())?;
        ip(&[&ns[..], &["link", "set", &inner, "up"]].concat())?;
        ip(&[&ns[..], &["link", "set", "lo", "up"]].concat())?;
        Ok(())
    }

    /// Builds a rig, or returns `None` after printing why the test skips; with
    /// `MPSDEV_REQUIRE_NETNS` set, a rig that cannot be made fails the test instead.
    pub fn or_skip(roles: &[&str]) -> Option<Rig> {
        match Rig::new(roles) {
            Ok(rig) => {
                eprintln!("rig {}: {}", rig.tag, rig.describe());
                Some(rig)
            }
            Err(err) if std::env::var_os("MPSDEV_REQUIRE_NETNS").is_some() => {
                panic!("the network-namespace rig cannot be made: {err}")
            }
            Err(err) => {
                eprintln!(
                    "SKIPPED: the network-namespace rig cannot be made here ({err}); it needs \
                     root, iproute2 and namespaces (set MPSDEV_REQUIRE_NETNS to fail instead)"
                );
                None
            }
        }
    }

    /// "client 10.213.5.2, proxy 10.213.5.3, …".
    pub fn describe(&self) -> String {
        let hosts: Vec<String> = self.hosts.iter().map(|h| format!("{} {}", h.role, h.ip)).collect();
        hosts.join(", ")
    }

    /// The host with `role`.
    pub fn host(&self, role: &str) -> &Host {
        self.hosts.iter().find(|h| h.role == role).unwrap_or_else(|| panic!("no host {role}"))
    }

    /// Cuts `role`'s link (`up = false`): its packets vanish, nobody gets a reset. `true` mends it.
    pub fn set_link(&self, role: &str, up: bool) {
        let link = &self.host(role).link;
        ip(&["link", "set", link, if up { "up" } else { "down" }]).expect("set the link");
    }

    /// Caps `role`'s link at `rate` (tc syntax, "10mbit") both ways: `tbf` on each end.
    pub fn limit_rate(&self, role: &str, rate: &str) {
        let host = self.host(role);
        let tbf = ["root", "tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"];
        run("tc", &[&["qdisc", "add", "dev", host.link.as_str()][..], &tbf].concat())
            .expect("tbf on the bridge's end");
        let inner = format!("{}i", host.link);
        let args = [&["-n", host.netns.as_str(), "qdisc", "add", "dev", inner.as_str()][..], &tbf];
        run("tc", &args.concat()).expect("tbf on the host's end");
    }

    /// A daemon of `launch` run in `role`'s namespace, with `role`'s DNS settings.
    pub fn launch_in(&self, role: &str, launch: Launch) -> Launch {
        let Launch { command, dir } = launch;
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", &self.host(role).netns]).arg(command.get_program());
        wrapped.args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        Launch { command: wrapped, dir }
    }

    /// Runs `task` on a thread of its own inside `role`'s namespace (its sockets are that
    /// host's), on a runtime of its own; the handle gives its output.
    pub fn spawn_in<F, Fut, T>(&self, role: &str, task: F) -> tokio::task::JoinHandle<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.host(role).netns);
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("the namespace's file");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _ = tx.send(runtime.block_on(task()));
        });
        tokio::spawn(async move { rx.await.expect("the host's task panicked") })
    }

    /// Starts dnsmasq on `role`, answering for `records` (name, address) and nothing else, and
    /// points every host's resolver at it.
    pub fn start_dns(&mut self, role: &str, records: &[(&str, Ipv4Addr)]) -> Result<(), String> {
        let host = self.host(role).clone();
        let hosts_file = std::env::temp_dir().join(format!("{}-dns-hosts", self.tag));
        write_records(&hosts_file, records);
        let child = Command::new("ip")
            .args(["netns", "exec", &host.netns, "dnsmasq", "--keep-in-foreground", "--no-resolv"])
            .args(["--no-hosts", "--bind-interfaces", "--user=root", "--local-ttl=0"])
            .arg(format!("--listen-address={}", host.ip))
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .arg("--pid-file=")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|err| format!("cannot run dnsmasq ({err}); apt-get install dnsmasq-base"))?;
        self.dns = Some((child, hosts_file));
        for other in &self.hosts {
            let dir = PathBuf::from("/etc/netns").join(&other.netns);
            std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
            std::fs::write(dir.join("resolv.conf"), format!("nameserver {}\n", host.ip))
                .map_err(|err| err.to_string())?;
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    /// Replaces the DNS records and has dnsmasq read them again (SIGHUP).
    pub fn set_dns_records(&self, records: &[(&str, Ipv4Addr)]) {
        let (child, file) = self.dns.as_ref().expect("start_dns first");
        write_records(file, records);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP dnsmasq");
    }
}

fn write_records(path: &std::path::Path, records: &[(&str, Ipv4Addr)]) {
    let text: String = records.iter().map(|(name, ip)| format!("{ip} {name}\n")).collect();
    std::fs::write(path, text).expect("write the DNS records");
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some((mut child, file)) = self.dns.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(file);
        }
        for host in &self.hosts {
            let _ = ip(&["netns", "del", &host.netns]);
            let _ = ip(&["link", "del", &host.link]);
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&host.netns));
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// A TCP relay at `listen` (in the calling host's namespace) to `target` that holds every chunk
/// for `delay` in each direction: the latency of a distant host, which `netem` would give.
pub async fn delay_relay(listen: SocketAddr, target: SocketAddr, delay: Duration) {
    let listener = tokio::net::TcpListener::bind(listen).await.expect("bind the relay");
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                delayed_copy(client_read, server_write, delay),
                delayed_copy(server_read, client_write, delay)
            );
        });
    }
}

/// Copies `from` to `to`, each chunk sent `delay` after it arrived (chunks keep their order and
/// their spacing, so the link's latency grows, not its bandwidth).
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
