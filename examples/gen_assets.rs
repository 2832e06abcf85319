//! Writes the man pages and shell completions of `miden-proving-service` and `minedctl`.
//!
//! ```sh
//! cargo run --locked --example gen_assets -- target/assets
//! man -l target/assets/man/minedctl.1
//! ```

fn main() -> std::io::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "target/assets".to_owned());
    for path in miden_proving_service::assets::write(std::path::Path::new(&dir))? {
        println!("{}", path.display());
    }
    Ok(())
}
