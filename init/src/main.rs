//! `outpost-init`: PID 1 of a job container (see the library's docs).

fn main() {
    std::process::exit(outpost_init::main(std::env::args_os().skip(1).collect()));
}
