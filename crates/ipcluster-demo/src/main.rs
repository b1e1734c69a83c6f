//! Placeholder; the demo worker arrives with deploys.
fn main() {}
