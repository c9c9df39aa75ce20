//! `ferry-bench`: a load generator that speaks Logux protocol 5 itself, to drive Ferry and any
//! other Logux server (`@logux/server` 0.14 included) with many clients from one process.
//!
//! Scenarios: `storm` (reconnect storm and mass disconnect), `fanout` (one busy room), `idle`
//! (many idle connections), `acks` (durable acknowledgements without fan-out), `backlog` (one
//! client's huge offline backlog in one `sync`, timed by bystander pings). Each prints one JSON summary on stdout and progress on stderr,
//! is bounded in count and time (`--timeout-s`), and talks to loopback addresses only.
//! See bench/README.md.

mod acks;
mod backlog;
mod client;
mod common;
mod fanout;
mod idle;
mod monitor;
mod net;
mod proto;
mod sending;
mod stats;
mod storm;
mod sys;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code for a run that finished and found no problem.
const EXIT_OK: u8 = 0;
/// Exit code for a run that lost or duplicated actions, missed deliveries, or timed out.
const EXIT_FAILED: u8 = 1;
/// Exit code for bad flags or a setup that cannot work (fd limit, non-loopback URL).
const EXIT_USAGE: u8 = 2;

/// What a scenario hands back.
#[derive(Debug)]
pub struct Outcome {
    /// The JSON summary printed on stdout.
    pub summary: serde_json::Value,
    /// False when something was lost, duplicated or timed out.
    pub ok: bool,
}

#[derive(Parser, Debug)]
#[command(
    name = "ferry-bench",
    about = "Reconnect-storm, fan-out, idle-connection, acknowledgement and backlog load for Logux servers (protocol 5, loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N clients reconnect at once with K unsent actions and a subscription, then all drop.
    Storm(storm::StormArgs),
    /// C clients in one room each send M actions; everybody must receive everybody's.
    Fanout(fanout::FanoutArgs),
    /// Many idle authenticated connections; the server's memory per connection.
    Idle(idle::IdleArgs),
    /// C clients without subscriptions pipeline `sync`s: acknowledged (durable) actions/s.
    Acks(acks::AcksArgs),
    /// One long-offline client sends its whole backlog in one `sync` while pingers time pongs.
    Backlog(backlog::BacklogArgs),
}

impl Scenario {
    fn threads(&self) -> usize {
        match self {
            Scenario::Storm(a) => a.common.threads,
            Scenario::Fanout(a) => a.common.threads,
            Scenario::Idle(a) => a.common.threads,
            Scenario::Acks(a) => a.common.threads,
            Scenario::Backlog(a) => a.common.threads,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli.scenario.threads().max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("ferry-bench: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.scenario {
            Scenario::Storm(args) => storm::run(args).await,
            Scenario::Fanout(args) => fanout::run(args).await,
            Scenario::Idle(args) => idle::run(args).await,
            Scenario::Acks(args) => acks::run(args).await,
            Scenario::Backlog(args) => backlog::run(args).await,
        }
    });
    // Client tasks may still be closing sockets; do not wait for them.
    runtime.shutdown_background();
    match outcome {
        Ok(outcome) => {
            match serde_json::to_string_pretty(&outcome.summary) {
                Ok(text) => println!("{text}"),
                Err(error) => {
                    eprintln!("ferry-bench: cannot print the summary: {error}");
                    return ExitCode::from(EXIT_FAILED);
                }
            }
            if outcome.ok {
                ExitCode::from(EXIT_OK)
            } else {
                eprintln!("ferry-bench: FAILED (see ok/timed_out/lost/duplicated in the summary)");
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(message) => {
            eprintln!("ferry-bench: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
