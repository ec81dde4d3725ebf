//! `st-merge`: not implemented yet. It refuses honestly rather than pretend.

fn main() {
    eprintln!("st-merge: not implemented yet (see README.md for the tools that are ready)");
    std::process::exit(2);
}
