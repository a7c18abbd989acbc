//! The `quotad` binary: arguments → configuration → telemetry → the command (the HTTP
//! service by default).

use std::process::ExitCode;

use quotad::{cli, config::Config, telemetry};

/// mimalloc: the request path allocates small, short-lived buffers across two worker
/// threads, where glibc's malloc spent ~17 % of the CPU (perf, GET /quota under wrk).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match quotad::startup::runtime() {
        Ok(runtime) => runtime.block_on(serve()),
        Err(err) => {
            eprintln!("quotad: starting the runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match cli::parse(&args) {
        Ok(command) => command,
        Err(err) => {
            eprintln!("quotad: {err:#}");
            return ExitCode::from(64);
        }
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("quotad: configuration: {err:#}");
            return ExitCode::from(78);
        }
    };
    if command == cli::Command::Serve {
        telemetry::init_tracing();
    } else {
        telemetry::init_tracing_quiet();
    }
    match cli::run(command, config).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("quotad: {err:#}");
            ExitCode::FAILURE
        }
    }
}
