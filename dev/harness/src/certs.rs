//! Certificates made with `openssl` as an operator would make them: a CA, and certificates it
//! signs for servers and clients alike, in PEM files (`NAME.pem`, `NAME.key`) in one directory.

use std::path::Path;
use std::process::Command;

/// Runs `openssl ARGS…` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").current_dir(dir).args(args).output().unwrap_or_else(
        |err| panic!("cannot run openssl ({err}); install it (Debian: apt-get install openssl)"),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openssl {args:?}: {stderr}");
}

/// A CA, `NAME.pem` and `NAME.key` in `dir`.
pub fn make_ca(dir: &Path, name: &str) {
    let (pem, key, subject) = (format!("{name}.pem"), format!("{name}.key"), format!("/CN={name}"));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let out = ["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subject];
    openssl(dir, &[&["req", "-x509"][..], &ec, &out].concat());
}

/// A certificate `NAME.pem`/`NAME.key` signed by the CA `ca`, for `localhost`, 127.0.0.1 and
/// the `ips` given, good for servers and clients alike.
pub fn make_cert(dir: &Path, name: &str, ca: &str, ips: &[std::net::IpAddr]) {
    let (pem, key, csr, ext) =
        (format!("{name}.pem"), format!("{name}.key"), format!("{name}.csr"), format!("{name}.ext"));
    let mut names = String::from("DNS:localhost,IP:127.0.0.1");
    for ip in ips {
        names.push_str(&format!(",IP:{ip}"));
    }
    let extensions = format!("subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\n");
    std::fs::write(dir.join(&ext), extensions).expect("write the extensions");
    let subject = format!("/CN={name}");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(dir, &[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", &subject]].concat());
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(dir, &[
        "x509", "-req", "-in", &csr, "-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial", "-out",
        &pem, "-days", "2", "-extfile", &ext,
    ]);
}
