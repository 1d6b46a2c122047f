// The migrations are compiled in (refinery::embed_migrations!): a migration file added or
// removed must rebuild the crate, not only one edited.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
