//! `eplb-worker`: parse the arguments, set up logging, run the subcommand, map errors to exit codes.

use clap::Parser;
use eplb::cli::{Cli, Command};
use eplb::exit::Failure;

fn main() {
    eplb::failure::install_panic_hook();
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_target(false).init();
    let code = match &cli.command {
        Command::Plan(args) => match eplb::plan::run_plan(args) {
            Ok(outcome) => {
                eprint!("{}", outcome.summary);
                0
            }
            Err(e) => {
                eprintln!("eplb-worker plan: error: {e}");
                e.exit_code()
            }
        },
        Command::Run(args) => match eplb::run::run(args) {
            Ok(_) => 0,
            // `run` printed the error already, before MPI stopped (see its documentation).
            Err(e) => e.exit_code(),
        },
        Command::Simulate(args) => match eplb::simulate::run_simulate(args) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("eplb-worker simulate: error: {e}");
                e.exit_code()
            }
        },
        Command::BenchMigrate(args) => match eplb::bench::run_bench(args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("eplb-worker bench-migrate: error: {e}");
                e.exit_code()
            }
        },
        Command::Plot(args) => match eplb::plot::run_plot(args) {
            Ok(files) => {
                for f in files {
                    eprintln!("eplb-worker plot: wrote {}", f.display());
                }
                0
            }
            Err(e) => {
                eprintln!("eplb-worker plot: error: {e}");
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}
