//! The params sector (disk sector 1, linked at 0x7E00): one build serves every run because the
//! runner patches its per-run copy of the image. The format is text, so neither side needs the
//! other's struct layout: `ACKPARAMS key=value key=value ...` padded with NUL bytes.
//!
//! **Runs in:** PASSIVE (read once at boot).

use ackvisor_vmm::intr::vector_policy::VectorPolicy;

/// Tag the sector starts with; the runner checks it before patching.
pub const MAGIC: &[u8] = b"ACKPARAMS";
const SECTOR: usize = 512;

const fn default_sector() -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    let mut i = 0;
    while i < MAGIC.len() {
        s[i] = MAGIC[i];
        i += 1;
    }
    s
}

#[used]
#[unsafe(link_section = ".params")]
static PARAMS_SECTOR: [u8; SECTOR] = default_sector();

/// The run's parameters, with the defaults used when the sector does not name them.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Scenario name (`boot`, `modes`, `vmcall`, `cycles`, `rejected`, `bench`, `demo`, `serve`).
    pub scenario: [u8; 16],
    /// Length of `scenario`.
    pub scenario_len: usize,
    /// Workload rounds per mode.
    pub rounds: u32,
    /// TSC ticks between clock interrupts.
    pub clock_period: u32,
    /// TSC ticks each workload stretch spins.
    pub stretch: u32,
    /// Virtualize/devirtualize cycles (scenario `cycles`).
    pub cycles: u32,
    /// Clock ticks per mode in `bench`.
    pub bench_ticks: u32,
    /// `bench`: clock ticks per mode taken halted between two magic breakpoints, for the
    /// runner's Bochs trace (0: no traced phase).
    pub trace_ticks: u32,
    /// Start the APs (INIT-SIPI-SIPI) when 1.
    pub smp: u32,
    /// Print per-vector tables and core statistics when 1.
    pub verbose: u32,
    /// Modes `modes` runs, a bit per `Mode as u32` (default all four).
    pub modes: u32,
    /// TSC ticks each handler spends in its body (longer: more interrupts arrive inside one).
    pub handler_body: u32,
    /// Send cross-CPU IPIs in team workloads (1, the default) or not (0).
    pub cross: u32,
    /// `serve`: rounds each CPU runs at least before the runner's finish word ends the run.
    pub min_rounds: u32,
    /// `serve`: the mode to virtualize in (`Mode as u32`; the text names it, `start_mode=exit-sti`).
    pub start_mode: u32,
    /// `modes`: the clock vector's delivery policy, set through the core after virtualizing
    /// (`VectorPolicy as u32`; the text names it, `clock_policy=replay`). `None`: the
    /// platform's default (`auto`).
    pub clock_policy: Option<u32>,
    /// Words of the sector that name no param or carry a value it cannot take: the run fails
    /// on them rather than silently running with a default.
    pub rejected: u32,
    /// The first such word (cut to its length), for the failure line.
    pub first_rejected: [u8; 32],
    /// Length of `first_rejected`.
    pub first_rejected_len: usize,
}

impl Params {
    /// The scenario name.
    pub fn scenario(&self) -> &str {
        core::str::from_utf8(self.scenario.get(..self.scenario_len).unwrap_or(&[])).unwrap_or("?")
    }

    /// The first rejected word (empty when none was).
    pub fn first_rejected(&self) -> &str {
        let bytes = self.first_rejected.get(..self.first_rejected_len);
        core::str::from_utf8(bytes.unwrap_or(&[])).unwrap_or("?")
    }

    fn reject(&mut self, word: &str) {
        crate::kprintln!("params: unknown or malformed {word}");
        if self.rejected == 0 {
            // Cut at a character boundary so the copy stays UTF-8.
            let mut n = word.len().min(self.first_rejected.len());
            while !word.is_char_boundary(n) {
                n -= 1;
            }
            self.first_rejected[..n].copy_from_slice(&word.as_bytes()[..n]);
            self.first_rejected_len = n;
        }
        self.rejected += 1;
    }

    /// Reads the sector as loaded by the MBR.
    pub fn read() -> Params {
        let mut p = Params {
            scenario: [0; 16],
            scenario_len: 4,
            rounds: 400,
            clock_period: 6000,
            stretch: 3000,
            cycles: 20,
            bench_ticks: 1000,
            trace_ticks: 0,
            smp: 0,
            verbose: 0,
            min_rounds: 0,
            cross: 1,
            modes: 0xF,
            handler_body: 300,
            start_mode: ackvisor_vmm::Mode::AckReplay as u32,
            clock_policy: None,
            rejected: 0,
            first_rejected: [0; 32],
            first_rejected_len: 0,
        };
        p.scenario[..4].copy_from_slice(b"boot");
        let mut text = [0u8; SECTOR];
        for (i, b) in text.iter_mut().enumerate() {
            // SAFETY: in bounds of the static; volatile because the runner changed the bytes in the
            // image after the compiler saw the initializer.
            *b = unsafe { core::ptr::read_volatile(PARAMS_SECTOR.as_ptr().wrapping_add(i)) };
        }
        let end = text.iter().position(|&b| b == 0).unwrap_or(SECTOR);
        let text = core::str::from_utf8(&text[..end]).unwrap_or("");
        for word in text.split_ascii_whitespace().skip(1) {
            let Some((key, value)) = word.split_once('=') else {
                p.reject(word);
                continue;
            };
            let num = value.parse::<u32>().ok();
            match (key, num) {
                ("scenario", _) => {
                    let n = value.len().min(p.scenario.len());
                    p.scenario[..n].copy_from_slice(&value.as_bytes()[..n]);
                    p.scenario_len = n;
                }
                ("rounds", Some(v)) => p.rounds = v,
                ("clock_period", Some(v)) => p.clock_period = v.max(500),
                ("stretch", Some(v)) => p.stretch = v,
                ("cycles", Some(v)) => p.cycles = v,
                ("bench_ticks", Some(v)) => p.bench_ticks = v,
                ("trace_ticks", Some(v)) => p.trace_ticks = v,
                ("smp", Some(v)) => p.smp = v,
                ("verbose", Some(v)) => p.verbose = v,
                ("min_rounds", Some(v)) => p.min_rounds = v,
                ("cross", Some(v)) => p.cross = v,
                ("modes", Some(v)) => p.modes = v,
                ("handler_body", Some(v)) => p.handler_body = v,
                ("start_mode", _) if ackvisor_vmm::Mode::from_name(value).is_some() => {
                    p.start_mode = ackvisor_vmm::Mode::from_name(value).map_or(0, |m| m as u32);
                }
                ("clock_policy", _) if VectorPolicy::from_name(value).is_some() => {
                    p.clock_policy = VectorPolicy::from_name(value).map(|v| v as u32);
                }
                // The runner puts these in the driver image's disk header (`ntos::disk`).
                ("image" | "fault", _) => {}
                // The runner picks which build of the driver image it puts there.
                ("profile", _) if matches!(value, "debug" | "release") => {}
                _ => p.reject(word),
            }
        }
        p
    }
}
