//! The four interrupt modes of DESIGN §2.
//!
//! **Runs in:** anywhere (pure).

/// How external interrupts reach the guest. The same on every processor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Mode {
    /// No external-interrupt exiting: the guest IDT takes interrupts directly.
    Passthrough = 0,
    /// Exiting on, ack-on-exit off: root opens an interrupt window (`sti; nop; cli`).
    ExitSti = 1,
    /// Exiting and ack-on-exit on: root replays the vector through this CPU's IDT.
    AckReplay = 2,
    /// Exiting and ack-on-exit on: the vector is injected into the guest at VM entry.
    AckInject = 3,
}

impl Mode {
    /// Every mode, in wire order.
    pub const ALL: [Mode; 4] = [
        Mode::Passthrough,
        Mode::ExitSti,
        Mode::AckReplay,
        Mode::AckInject,
    ];

    /// The name `ackctl` uses.
    pub const fn name(self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::ExitSti => "exit-sti",
            Mode::AckReplay => "ack-replay",
            Mode::AckInject => "ack-inject",
        }
    }

    /// Parses an `ackctl` mode name.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// Pin-based control 0 (external-interrupt exiting) for this mode.
    pub const fn exits_on_interrupts(self) -> bool {
        !matches!(self, Mode::Passthrough)
    }

    /// VM-exit control 15 (acknowledge interrupt on exit) for this mode.
    pub const fn acks_on_exit(self) -> bool {
        matches!(self, Mode::AckReplay | Mode::AckInject)
    }
}

impl TryFrom<u32> for Mode {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            0 => Ok(Mode::Passthrough),
            1 => Ok(Mode::ExitSti),
            2 => Ok(Mode::AckReplay),
            3 => Ok(Mode::AckInject),
            other => Err(other),
        }
    }
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_wire_values_are_stable() {
        for m in Mode::ALL {
            assert_eq!(Mode::from_name(m.name()), Some(m));
            assert_eq!(Mode::try_from(m as u32), Ok(m));
        }
        assert_eq!(Mode::try_from(4), Err(4));
        assert_eq!(Mode::from_name("ack"), None);
    }

    #[test]
    fn control_bits_follow_design_table() {
        assert!(!Mode::Passthrough.exits_on_interrupts());
        assert!(Mode::ExitSti.exits_on_interrupts() && !Mode::ExitSti.acks_on_exit());
        assert!(Mode::AckReplay.acks_on_exit() && Mode::AckInject.acks_on_exit());
    }
}
