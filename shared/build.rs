//! `refinery::embed_migrations!` reads `migrations/` at compile time, and cargo does not know:
//! without this, a new migration file is not embedded until something else rebuilds the crate.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
