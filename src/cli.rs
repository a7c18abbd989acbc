//! The command line: `quotad [serve]`, `quotad sync --once`, `quotad backfill`,
//! `quotad verify`, `quotad phase [set NAME]`. Each takes the configuration of the server
//! (environment and `QUOTAD_CONFIG`) and answers `--help`.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::{Context, bail};

use crate::{
    config::Config,
    domain::{Phase, sync::SwitchError, tools},
    startup::{self, Application},
};

const USAGE: &str = "quotad: quota and rate-limit decisions, Redis in front of Firestore

Usage:
  quotad [serve]            run the HTTP service (the default)
  quotad sync --once        write every unsynced usage to Firestore now, print the report
  quotad backfill           load every provider document into Redis (resumable)
  quotad verify             compare every cached record with its document; exit 1 on drift
  quotad phase              print the stored migration phase
  quotad phase set NAME     switch every replica to firestore-only, dual-write or redis-primary
  quotad COMMAND --help     help of one command

Configuration comes from the environment (REDIS_URL, FIRESTORE_PROJECT_ID, ...) and the
TOML file at QUOTAD_CONFIG, as for the server.";

/// What the arguments ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Serve,
    SyncOnce,
    Backfill,
    Verify,
    ShowPhase,
    SetPhase(Phase),
    Help(&'static str),
}

fn help_of(command: &str) -> &'static str {
    match command {
        "sync" => {
            "quotad sync --once\n\nRuns one batch sync under the cross-replica lock: every dirty Redis record's\nunsynced usage is written to its Firestore document exactly once. Prints the report as\nJSON; exits 1 when a write failed (run it again: nothing is written twice) and 2 when\nanother sync holds the lock."
        }
        "backfill" => {
            "quotad backfill\n\nLoads every provider document into Redis before entering dual-write or redis-primary,\nso the first requests find their records warm. Records already cached are kept, so an\ninterrupted run can simply be started again."
        }
        "verify" => {
            "quotad verify\n\nCompares every cached record with its document and prints one line per record that\ndrifts: cached usage, stored usage, usage not yet written and the drift (stored +\nunsynced - cached). Exits 1 when any record drifts or is stale, 0 otherwise."
        }
        "phase" => {
            "quotad phase [set NAME]\n\nWithout arguments prints the stored phase. `set NAME` switches every replica (within\n5 s) to firestore-only, dual-write or redis-primary. Leaving redis-primary first runs a\nfull sync and refuses (exit 1, phase unchanged) while anything stays unsynced."
        }
        _ => USAGE,
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> anyhow::Result<Command> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if args.iter().any(|a| *a == "--help" || *a == "-h") {
        return Ok(Command::Help(help_of(args.first().copied().unwrap_or(""))));
    }
    match args.as_slice() {
        [] | ["serve"] => Ok(Command::Serve),
        ["help"] => Ok(Command::Help(USAGE)),
        ["sync", "--once"] => Ok(Command::SyncOnce),
        ["sync", ..] => bail!("`quotad sync` needs --once (the server runs the schedule itself)"),
        ["backfill"] => Ok(Command::Backfill),
        ["verify"] => Ok(Command::Verify),
        ["phase"] => Ok(Command::ShowPhase),
        ["phase", "set", name] => Phase::parse(name)
            .map(Command::SetPhase)
            .with_context(|| format!("unknown phase {name:?}: firestore-only, dual-write or redis-primary")),
        _ => bail!("unknown command {:?}\n\n{USAGE}", args.join(" ")),
    }
}

/// Runs a command to completion.
pub async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Help(text) => {
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until(startup::shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::SyncOnce => {
            let (_, sync) = startup::tools(&config).await?;
            match sync.run_once().await {
                Ok(report) => {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                    Ok(if report.failed == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    })
                }
                Err(crate::domain::sync::SyncError::Running) => {
                    eprintln!("another sync holds the lock; try again when it is done");
                    Ok(ExitCode::from(2))
                }
                Err(err) => Err(err.into()),
            }
        }
        Command::Backfill => {
            let (quotas, _) = startup::tools(&config).await?;
            let terminal = std::io::stderr().is_terminal();
            let loaded = tools::backfill(&quotas, config.default_limit, |count| {
                progress(terminal, "loaded", count)
            })
            .await
            .context("backfill stopped (run it again to resume)")?;
            finish_progress(terminal);
            println!("backfill done: {loaded} provider documents checked, cached records kept");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let (quotas, _) = startup::tools(&config).await?;
            let terminal = std::io::stderr().is_terminal();
            let mut seen = 0u64;
            let drifted = tools::verify(&quotas, |_| {
                seen += 1;
                if seen.is_multiple_of(500) {
                    progress(terminal, "checked", seen);
                }
            })
            .await?;
            finish_progress(terminal);
            for d in &drifted {
                println!(
                    "{}\tcached={}\tstored={}\tunsynced={}\tdrift={}{}",
                    d.provider,
                    d.cached,
                    d.stored,
                    d.unsynced,
                    d.drift,
                    if d.stale { "\tSTALE" } else { "" }
                );
            }
            println!("verify: {seen} cached records checked, {} drifting", drifted.len());
            if let Some(loss) = quotas.ledger().meta("redis-loss").await? {
                println!("verify: Redis came back empty at least once; the last time: {loss}");
                println!("verify: usage admitted but not yet written to Firestore then is lost");
            }
            Ok(if drifted.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::ShowPhase => {
            let (quotas, _) = startup::tools(&config).await?;
            let (phase, since) = quotas.phase();
            println!("{phase} (since {})", since.to_rfc3339());
            Ok(ExitCode::SUCCESS)
        }
        Command::SetPhase(target) => {
            let (_, sync) = startup::tools(&config).await?;
            match sync.switch_phase(target).await {
                Ok((phase, since)) => {
                    println!(
                        "{phase} (since {}); every replica follows within 5 s",
                        since.to_rfc3339()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(SwitchError::Incomplete) => {
                    eprintln!("usage is left unsynced: the phase is unchanged (see `quotad verify`)");
                    Ok(ExitCode::FAILURE)
                }
                Err(err) => Err(err.into()),
            }
        }
    }
}

/// A progress line: redrawn in place on a terminal, one line each otherwise.
fn progress(terminal: bool, what: &str, count: u64) {
    if terminal {
        eprint!("\r{what} {count}…");
    } else {
        eprintln!("{what} {count}");
    }
}

fn finish_progress(terminal: bool) {
    if terminal {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn commands_parse() {
        assert_eq!(parse(&args("")).unwrap(), Command::Serve);
        assert_eq!(parse(&args("serve")).unwrap(), Command::Serve);
        assert_eq!(parse(&args("sync --once")).unwrap(), Command::SyncOnce);
        assert_eq!(
            parse(&args("phase set redis-primary")).unwrap(),
            Command::SetPhase(Phase::RedisPrimary)
        );
        assert!(
            matches!(parse(&args("verify --help")).unwrap(), Command::Help(text) if text.starts_with("quotad verify"))
        );
        assert!(parse(&args("sync")).is_err());
        assert!(parse(&args("phase set sideways")).is_err());
        assert!(parse(&args("frobnicate")).is_err());
    }
}
