//! The tests' shared PostgreSQL cluster (`outpost_tests::pg`) from the shell.
//!
//! - `outpost-test-pg start`: starts it unless it runs; prints its admin URL;
//! - `outpost-test-pg stop`: stops it if it runs and deletes its directory,
//!   quietly (`scripts/test.sh` runs this before and after the suite);
//! - `outpost-test-pg dir`: prints its directory.
//!
//! Environment: `OUTPOST_PG_DIR`, `OUTPOST_PG_BIN`, as for the tests.

use std::process::ExitCode;

use outpost_tests::pg;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let result = match arg.as_str() {
        "start" => pg::start_shared().map(|s| println!("{}", s.admin_url())),
        "stop" => pg::stop_shared().map(|_| ()),
        "dir" => {
            println!("{}", pg::shared_dir().display());
            Ok(())
        }
        _ => {
            eprintln!("usage: outpost-test-pg start|stop|dir");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-test-pg {arg}: {e}");
            ExitCode::FAILURE
        }
    }
}
