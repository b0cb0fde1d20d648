//! The command line: `ackctl [--machine HOST:PORT] [--json] <status | mode M | stats ... |
//! policy [VECTOR POLICY]>`.

use std::time::Duration;

use ackvisor_vmm::Mode;
use ackvisor_vmm::intr::vector_policy::VectorPolicy;
use clap::{Args, Parser, Subcommand};

/// Switch ackvisor's interrupt mode and read its statistics.
#[derive(Debug, Parser)]
#[command(name = "ackctl", version)]
pub struct Cli {
    /// Talk to the Bochs test machine (its COM1 as a TCP socket server) instead of the
    /// Windows device \\.\Ackvisor.
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub machine: Option<String>,

    /// Seconds to wait for each reply over --machine before retrying.
    #[arg(long, global = true, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    pub timeout: Duration,

    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Versions, CPUs, each CPU's mode, VMX features, memory per CPU.
    Status,
    /// Switch the interrupt mode on every CPU; returns once all have applied it.
    Mode {
        /// passthrough | exit-sti | ack-replay | ack-inject
        #[arg(value_parser = parse_mode)]
        mode: Mode,
    },
    /// Exit, delivery and cost counters (or `stats reset`).
    Stats(StatsArgs),
    /// The per-vector delivery policy of ack-replay (`policy`), or set one vector's on every
    /// CPU (`policy 0xd1 inject`).
    Policy(PolicyArgs),
}

/// `ackctl policy [VECTOR POLICY]`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// The vector to set (decimal or 0x hex); without it, show the table.
    #[arg(value_name = "VECTOR", value_parser = parse_vector, requires = "policy")]
    pub vector: Option<u8>,

    /// replay | inject | auto (inject while the guest's IRQL is below DISPATCH, else replay)
    #[arg(value_name = "POLICY", value_parser = parse_policy)]
    pub policy: Option<VectorPolicy>,
}

/// `ackctl stats ...`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct StatsArgs {
    /// `reset` zeroes every CPU's counters.
    #[command(subcommand)]
    pub action: Option<StatsAction>,

    /// One row per CPU besides the total.
    #[arg(long)]
    pub per_cpu: bool,

    /// Only this vector (decimal or 0x hex).
    #[arg(long, value_name = "N", value_parser = parse_vector)]
    pub vector: Option<u8>,

    /// Sample again every SECS seconds, with rates since the previous sample.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub watch: Option<Duration>,
}

/// `ackctl stats <action>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Subcommand)]
pub enum StatsAction {
    /// Zero every CPU's counters.
    Reset,
}

/// Parses a mode by the names `ackvisor_vmm::Mode` gives them.
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Mode::ALL.iter().map(|m| m.name()).collect();
        format!("unknown mode {s:?}; expected one of {}", names.join(", "))
    })
}

/// Parses a delivery policy by the names `VectorPolicy` gives them.
pub fn parse_policy(s: &str) -> Result<VectorPolicy, String> {
    VectorPolicy::from_name(s).ok_or_else(|| {
        let names: Vec<_> = VectorPolicy::ALL.iter().map(|p| p.name()).collect();
        format!("unknown policy {s:?}; expected one of {}", names.join(", "))
    })
}

/// Parses a vector: decimal (`209`) or hex (`0xd1`), 0..=255.
pub fn parse_vector(s: &str) -> Result<u8, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse::<u8>(),
    };
    parsed.map_err(|_| format!("vector {s:?} is not a number from 0 to 255 (or 0x00 to 0xff)"))
}

/// Parses a positive number of seconds (fractions allowed, at most a day).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "{s} seconds is out of range (more than 0, at most 86400)"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ackctl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn modes_parse_by_their_protocol_names_only() {
        for m in Mode::ALL {
            assert_eq!(parse_mode(m.name()), Ok(m));
        }
        let e = parse_mode("ack").unwrap_err();
        assert!(e.contains("ack-replay") && e.contains("passthrough"), "{e}");
        let cli = parse(&["mode", "ack-inject"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Mode {
                mode: Mode::AckInject
            }
        ));
        assert!(parse(&["mode", "replay"]).is_err());
    }

    #[test]
    fn vectors_parse_as_decimal_or_hex_within_a_byte() {
        assert_eq!(parse_vector("209"), Ok(0xd1));
        assert_eq!(parse_vector("0xD1"), Ok(0xd1));
        assert_eq!(parse_vector("0x2f"), Ok(0x2f));
        assert!(parse_vector("256").is_err());
        assert!(parse_vector("0x100").is_err());
        assert!(parse_vector("-1").is_err());
    }

    #[test]
    fn watch_and_timeout_take_positive_seconds() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-2").is_err());
        assert!(parse_secs("NaN").is_err());
        assert!(parse_secs("1e9").is_err());
    }

    #[test]
    fn stats_takes_flags_or_reset_but_not_both() {
        let cli = parse(&["stats", "--per-cpu", "--vector", "0xd1", "--json"]).unwrap();
        let Command::Stats(s) = &cli.command else {
            panic!()
        };
        assert!(s.per_cpu && cli.json && s.action.is_none());
        assert_eq!(s.vector, Some(0xd1));
        let cli = parse(&["stats", "reset"]).unwrap();
        let Command::Stats(s) = &cli.command else {
            panic!()
        };
        assert_eq!(s.action, Some(StatsAction::Reset));
        assert!(parse(&["stats", "--per-cpu", "reset"]).is_err());
    }

    #[test]
    fn machine_is_global() {
        let cli = parse(&["status", "--machine", "localhost:5555"]).unwrap();
        assert_eq!(cli.machine.as_deref(), Some("localhost:5555"));
        let cli = parse(&["--machine", "h:1", "stats", "--watch", "2"]).unwrap();
        let Command::Stats(s) = &cli.command else {
            panic!()
        };
        assert_eq!(s.watch, Some(Duration::from_secs(2)));
        assert_eq!(cli.timeout, Duration::from_secs(3));
    }

    #[test]
    fn policy_shows_without_arguments_and_sets_with_both() {
        let cli = parse(&["policy"]).unwrap();
        let Command::Policy(p) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((p.vector, p.policy), (None, None));
        let cli = parse(&["policy", "0xd1", "inject"]).unwrap();
        let Command::Policy(p) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            (p.vector, p.policy),
            (Some(0xd1), Some(VectorPolicy::Inject))
        );
        let cli = parse(&["policy", "209", "auto"]).unwrap();
        let Command::Policy(p) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!((p.vector, p.policy), (Some(0xd1), Some(VectorPolicy::Auto)));
        // A vector alone, an unknown policy, or a vector past a byte are usage errors.
        assert!(parse(&["policy", "0xd1"]).is_err());
        assert!(parse(&["policy", "0xd1", "Replay"]).is_err());
        assert!(parse(&["policy", "0x100", "inject"]).is_err());
    }
}
