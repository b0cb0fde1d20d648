//! `ackctl`, the client of ackvisor's control protocol (`ackvisor_vmm::control`).
//!
//! - [`cli`]: the command line (clap).
//! - [`transport`]: how requests travel: the Windows device (`DeviceIoControl`) or the test
//!   machine's serial link as a TCP socket, framed by `control::frame`.
//! - [`session`]: typed requests over a transport (size queries, version checks).
//! - [`render`]: tables for people, JSON for scripts; [`histogram`]: the root-cycle bars.
//! - [`error`]: [`ClientError`] and its exit codes.
//!
//! The wire format is imported from `ackvisor_vmm::control::wire`, never re-declared here.
//!
//! **Runs in:** user mode.

pub mod cli;
pub mod error;
pub mod histogram;
pub mod render;
pub mod session;
pub mod transport;

use std::io::Write;
use std::time::{Duration, Instant};

pub use error::ClientError;

use cli::{Cli, Command, StatsAction};
use session::Session;
use transport::Transport;

/// Runs one command line, writing its output to `out`.
pub fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), ClientError> {
    let transport = transport::open(cli)?;
    run_with(cli, transport, out)
}

/// Runs one command line over an already open transport (the tests' entry point).
pub fn run_with(
    cli: &Cli,
    transport: Box<dyn Transport>,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let mut session = Session::new(transport);
    let json = cli.json;
    match &cli.command {
        Command::Status => {
            let status = session.status()?;
            render::status(&status, json, out)
        }
        Command::Mode { mode } => {
            let applied = session.set_mode(*mode)?;
            render::mode_applied(*mode, applied, json, out)
        }
        Command::Stats(args) => match args.action {
            Some(StatsAction::Reset) => {
                let cpus = session.reset_stats()?;
                render::reset(cpus, json, out)
            }
            None => {
                let view = render::StatsView {
                    per_cpu: args.per_cpu,
                    vector: args.vector,
                    json,
                };
                match args.watch {
                    None => {
                        let sample = session.stats(args.per_cpu)?;
                        render::stats(&sample, None, &view, out)
                    }
                    Some(secs) => watch(&mut session, secs, &view, out),
                }
            }
        },
        Command::Policy(args) => match (args.vector, args.policy) {
            (Some(vector), Some(policy)) => {
                let cpus = session.set_policy(vector, policy)?;
                render::policy_applied(vector, policy, cpus, json, out)
            }
            _ => {
                let table = session.policy()?;
                render::policy(&table, json, out)
            }
        },
    }
}

/// `--watch SECS`: a sample every `period`, each shown with its rates since the previous one,
/// until the hypervisor or the link fails (or the user presses Ctrl-C).
fn watch(
    session: &mut Session,
    period: Duration,
    view: &render::StatsView,
    out: &mut dyn Write,
) -> Result<(), ClientError> {
    let mut previous: Option<(session::StatsSample, Instant)> = None;
    loop {
        let started = Instant::now();
        let sample = session.stats(view.per_cpu)?;
        if previous.is_some() && !view.json {
            // A blank line between tables; JSON stays one document per line.
            out.write_all(b"\n")
                .map_err(|e| ClientError::Io(e.kind()))?;
        }
        let rates = previous
            .as_ref()
            .map(|(p, at)| (&p.aggregate, started.duration_since(*at).as_secs_f64()));
        render::stats(&sample, rates, view, out)?;
        out.flush().map_err(|e| ClientError::Io(e.kind()))?;
        previous = Some((sample, started));
        std::thread::sleep(period.saturating_sub(started.elapsed()));
    }
}
