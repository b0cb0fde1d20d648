//! Runs ackvisor's test machine (`tests/kernel`) under Bochs and reads its verdicts.
//!
//! - [`kernel_image`] builds the kernel once per process (its own cargo target directory under
//!   the workspace `target/`, a lock file so parallel test processes don't race) and flattens
//!   it with objcopy into a disk image whose sector 0 is the kernel's MBR.
//! - [`run`] copies the image per run, patches the params sector (sector 1: text,
//!   `ACKPARAMS key=value ...`), writes a bochsrc, runs Bochs headless with a timeout and
//!   collects the console (port 0xE9) and its `RESULT <scenario> key=value ...` lines. Bochs
//!   always exits with code 1, so only the output counts.
//! - [`Verdict`] compares fields and, on failure, names the model, the line, the field, the
//!   expected and the got value.
//!
//! - [`start`] returns a running [`Machine`]; with [`RunSpec::serve`] its COM1 is a TCP socket
//!   server that the [`relay`] holds the one connection to (Bochs accepts exactly one client),
//!   and `ackctl --machine localhost:PORT` connects to the relay, one command at a time.
//! - [`ackctl`] finds (building it if needed) and runs the real `ackctl` binary.
//!
//! **Runs in:** the Linux host (plain Rust; no shell scripts).

pub mod ackctl;
pub mod driver;
pub mod image_bench;
pub mod modes;
pub mod relay;
pub mod rootcode;
pub mod serve_driver;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// CPU models every scenario runs on.
pub const MODELS: [&str; 2] = ["corei7_haswell_4770", "corei7_skylake_x"];

/// One `#[test]` per scenario function and CPU model (the two in [`MODELS`]): each named
/// function `fn(model: &str)` gets a module of its own holding one test per model, so a failure
/// names both.
#[macro_export]
macro_rules! per_model {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn corei7_haswell_4770() {
                super::$test("corei7_haswell_4770");
            }
            #[test]
            fn corei7_skylake_x() {
                super::$test("corei7_skylake_x");
            }
        }
    )*};
}

/// Offset of the params sector in the image (sector 1, linked at 0x7E00).
const PARAMS_OFFSET: usize = 512;
const PARAMS_MAGIC: &[u8] = b"ACKPARAMS";
/// The geometry the bochsrc declares: 20 cylinders × 16 heads × 63 sectors.
const DISK_BYTES: u64 = 20 * 16 * 63 * 512;
/// Emulated instructions per emulated second. Only device timing depends on it (the kernel
/// prints through port 0xE9 and times itself with the TSC), and low is fast (bochs-prototype).
const IPS: u32 = 50_000_000;
/// [`IPS`] for runs with the serial link (see [`RunSpec::serve`]).
const SERIAL_IPS: u32 = 2_000_000;

const BOCHS_BIN: &str = "bochs-bin";
const BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
const VGABIOS: &str = "/usr/share/vgabios/vgabios.bin";
const TERM_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/bochs/plugins/libbx_term_gui.so";

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

fn find_in_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
        .unwrap_or(None)
}

/// Checks that Bochs and its ROMs are installed; the error says which Debian packages to add.
pub fn check_prerequisites() -> Result<(), String> {
    let mut missing = Vec::new();
    if find_in_path(BOCHS_BIN).is_none() {
        missing.push((BOCHS_BIN.to_string(), "bochs"));
    }
    for (path, package) in [
        (BIOS, "bochsbios"),
        (VGABIOS, "vgabios"),
        (TERM_PLUGIN, "bochs-term"),
    ] {
        if !Path::new(path).exists() {
            missing.push((path.to_string(), package));
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let what: Vec<_> = missing.iter().map(|(f, _)| f.as_str()).collect();
    let mut packages: Vec<_> = missing.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    Err(format!(
        "the test machine needs Bochs: missing {}. Install with: apt-get install {}",
        what.join(", "),
        packages.join(" ")
    ))
}

fn objcopy() -> Result<PathBuf, String> {
    ["objcopy", "llvm-objcopy", "rust-objcopy"]
        .into_iter()
        .find_map(find_in_path)
        .ok_or_else(|| "no objcopy found: apt-get install binutils".to_string())
}

/// Builds the kernel (once per process) and returns the path of the flat image.
pub fn kernel_image() -> Result<PathBuf, String> {
    kernel_image_with(true)
}

/// The image with the core's `stats` feature on (the default) or off (its own target
/// directory, `target/testkernel-nostats`), built once per process each.
pub fn kernel_image_with(stats: bool) -> Result<PathBuf, String> {
    static WITH: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static WITHOUT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let slot = if stats { &WITH } else { &WITHOUT };
    slot.get_or_init(|| build_kernel_image(stats)).clone()
}

/// The kernel's ELF (with symbols) behind [`kernel_image_with`], built if needed.
pub fn kernel_elf_with(stats: bool) -> Result<PathBuf, String> {
    let image = kernel_image_with(stats)?;
    let dir = image
        .parent()
        .ok_or_else(|| format!("{} has no directory", image.display()))?;
    Ok(dir.join("x86_64-unknown-linux-gnu/release/testkernel"))
}

fn build_kernel_image(stats: bool) -> Result<PathBuf, String> {
    let root = workspace_root();
    let kernel_dir = root.join("tests/kernel");
    let target_dir = root.join(if stats {
        "target/testkernel"
    } else {
        "target/testkernel-nostats"
    });
    fs::create_dir_all(&target_dir).map_err(|e| format!("create {}: {e}", target_dir.display()))?;
    // Another test process may be building right now: take the same lock.
    let lock_path = target_dir.join("build.lock");
    let lock =
        fs::File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The kernel's .cargo/config.toml holds its flags: cargo finds it from the working
    // directory. Flags from the environment would replace them, so they are removed.
    let status = Command::new(cargo)
        .current_dir(&kernel_dir)
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .args((!stats).then_some("--no-default-features"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS")
        .status()
        .map_err(|e| format!("run cargo for the test kernel: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building the test kernel failed ({status}); see the cargo output above"
        ));
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/testkernel");
    let image = target_dir.join("testmachine.img");
    let status = Command::new(objcopy()?)
        .args(["-O", "binary"])
        .args([
            "-j", ".boot", "-j", ".params", "-j", ".boot2", "-j", ".text", "-j", ".rodata", "-j",
            ".data",
        ])
        .arg(&elf)
        .arg(&image)
        .status()
        .map_err(|e| format!("run objcopy: {e}"))?;
    if !status.success() {
        return Err(format!("objcopy {} failed ({status})", elf.display()));
    }
    let bytes = fs::read(&image).map_err(|e| format!("read {}: {e}", image.display()))?;
    if bytes.len() < 1024
        || bytes[510..512] != [0x55, 0xAA]
        || !bytes[PARAMS_OFFSET..].starts_with(PARAMS_MAGIC)
    {
        return Err(format!(
            "{} is not a test-machine image (boot signature or params tag missing)",
            image.display()
        ));
    }
    drop(lock);
    Ok(image)
}

/// One Bochs run.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RunSpec {
    /// Bochs CPU model.
    pub model: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Params patched into the image (`scenario` first).
    pub params: Vec<(String, String)>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// The kernel image with the core's `stats` feature (default) or without it.
    pub stats: bool,
    /// COM1 as a TCP socket server, reached through [`Machine::control_addr`].
    pub serial: bool,
    /// Emulated instructions per emulated second (see [`IPS`]).
    pub ips: u32,
    /// Bochs instruction-trace windows, each opened and closed by a magic breakpoint
    /// (`xchg bx, bx`) in the kernel (see [`RunSpec::traced`]); 0 = no trace.
    pub trace_windows: u32,
}

impl RunSpec {
    /// A run of `scenario` on `model` with one CPU and default params.
    pub fn new(model: &str, scenario: &str) -> RunSpec {
        RunSpec {
            model: model.to_string(),
            cpus: 1,
            params: vec![("scenario".into(), scenario.into())],
            timeout: Duration::from_secs(120),
            stats: true,
            serial: false,
            ips: IPS,
            trace_windows: 0,
        }
    }

    /// Turns on Bochs's magic breakpoint and gives the debugger a script that traces every
    /// instruction of every CPU between the 1st and 2nd break, the 3rd and 4th, and so on, for
    /// `windows` windows ([`trace`] reads the lines).
    pub fn traced(mut self, windows: u32) -> RunSpec {
        self.trace_windows = windows;
        self
    }

    /// The debugger script: continue; then per window trace on (every CPU), continue, trace
    /// off, continue; quit.
    fn debugger_script(&self) -> String {
        let mut rc = String::from("c\n");
        for _ in 0..self.trace_windows {
            for on in ["on", "off"] {
                for cpu in 0..self.cpus {
                    let _ = write!(rc, "set $cpu = {cpu}\ntrace {on}\n");
                }
                rc.push_str("c\n");
            }
        }
        rc.push_str("quit\n");
        rc
    }

    /// A run of the `serve` scenario: COM1 on, the control server answering `ackctl`, the
    /// workload on every CPU until [`Machine::finish`] (then at least `min_rounds` per CPU).
    pub fn serve(model: &str, cpus: u32, min_rounds: u32) -> RunSpec {
        let mut spec = RunSpec::new(model, "serve")
            .cpus(cpus)
            .param("min_rounds", min_rounds);
        spec.serial = true;
        // Serial bytes take one character time each (69 µs at 115200 baud): fewer emulated
        // instructions per µs make a 7 KiB stats reply a few hundred thousand instructions
        // instead of millions. The LAPIC timer and the TSC count instructions, not µs.
        spec.ips = SERIAL_IPS;
        spec.timeout = Duration::from_secs(600);
        spec
    }

    /// Uses the kernel built without the core's `stats` feature.
    pub fn without_stats(mut self) -> RunSpec {
        self.stats = false;
        self
    }

    /// Adds a param.
    pub fn param(mut self, key: &str, value: impl ToString) -> RunSpec {
        self.params.push((key.into(), value.to_string()));
        self
    }

    /// Sets the CPU count (and asks the kernel to start the APs).
    pub fn cpus(mut self, cpus: u32) -> RunSpec {
        self.cpus = cpus;
        if cpus > 1 {
            self = self.param("smp", cpus);
        }
        self
    }

    /// The scenario name.
    pub fn scenario(&self) -> &str {
        self.params
            .iter()
            .find(|(k, _)| k == "scenario")
            .map_or("?", |(_, v)| v)
    }

    /// A directory name for this run.
    pub fn name(&self) -> String {
        let mut n = format!("{}-{}-c{}", self.scenario(), self.model, self.cpus);
        if !self.stats {
            n.push_str("-nostats");
        }
        if self.trace_windows > 0 {
            n.push_str("-traced");
        }
        for (k, v) in &self.params {
            if k != "scenario" && k != "smp" {
                let _ = write!(n, "-{k}{v}");
            }
        }
        n
    }

    fn params_text(&self) -> String {
        let mut s = String::from("ACKPARAMS");
        for (k, v) in &self.params {
            let _ = write!(s, " {k}={v}");
        }
        s
    }
}

/// A `RESULT <scenario> key=value ...` line.
#[derive(Clone, Debug)]
pub struct ResultLine {
    /// The scenario word.
    pub scenario: String,
    /// Its fields in order of appearance.
    pub fields: BTreeMap<String, String>,
    /// The line as printed.
    pub raw: String,
}

impl ResultLine {
    fn parse(line: &str) -> Option<ResultLine> {
        let rest = line.trim().strip_prefix("RESULT ")?;
        let mut words = rest.split_whitespace();
        let scenario = words.next()?.to_string();
        let fields = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(ResultLine {
            scenario,
            fields,
            raw: line.trim().to_string(),
        })
    }

    /// A field's text.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A field as a number (decimal or 0x hex).
    pub fn num(&self, key: &str) -> Option<u64> {
        let v = self.get(key)?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    }

    /// A short label: the scenario and its `mode` if it has one.
    pub fn label(&self) -> String {
        match self.get("mode") {
            Some(m) => format!("{} mode={m}", self.scenario),
            None => self.scenario.clone(),
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// What was run.
    pub spec: RunSpec,
    /// Everything the machine printed (Bochs's own banner included).
    pub console: String,
    /// The RESULT lines, in order.
    pub results: Vec<ResultLine>,
    /// The run's directory (console.txt, bochs.log, bochsrc, disk.img).
    pub out_dir: PathBuf,
    /// Wall time of the Bochs process.
    pub wall: Duration,
    /// The timeout killed Bochs.
    pub timed_out: bool,
}

impl RunOutput {
    /// RESULT lines of `scenario`, optionally only those with `mode=`.
    pub fn lines<'a>(
        &'a self,
        scenario: &str,
        mode: Option<&str>,
    ) -> impl Iterator<Item = &'a ResultLine> {
        let (scenario, mode) = (scenario.to_string(), mode.map(str::to_string));
        self.results.iter().filter(move |l| {
            l.scenario == scenario && (mode.is_none() || l.get("mode") == mode.as_deref())
        })
    }

    /// The first line of `scenario` with `mode` (if given) that is not a fatal/end line.
    pub fn line(&self, scenario: &str, mode: Option<&str>) -> Option<&ResultLine> {
        self.lines(scenario, mode)
            .find(|l| l.get("end").is_none() && l.get("fatal").is_none())
    }

    /// The last lines of the console, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.console, n)
    }
}

/// Runs the machine once, to its end (or the timeout).
pub fn run(spec: &RunSpec) -> Result<RunOutput, String> {
    start(spec)?.wait()
}

/// A running test machine: Bochs, its console, and (with [`RunSpec::serial`]) the relay that
/// lets `ackctl` reach COM1. Dropping it kills Bochs.
pub struct Machine {
    spec: RunSpec,
    child: Child,
    console: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    out_dir: PathBuf,
    started: Instant,
    relay: Option<relay::Relay>,
}

/// Boots the machine and returns at once (with a serial link: once Bochs accepted the relay's
/// connection, which it waits for before it runs anything).
pub fn start(spec: &RunSpec) -> Result<Machine, String> {
    check_prerequisites()?;
    let image = kernel_image_with(spec.stats)?;
    let out_dir = workspace_root().join("tests/out").join(spec.name());
    let _ = fs::remove_dir_all(&out_dir);
    fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;

    let mut disk = fs::read(&image).map_err(|e| format!("read {}: {e}", image.display()))?;
    let text = spec.params_text();
    if text.len() >= 512 {
        return Err(format!("params too long for the params sector: {text}"));
    }
    disk[PARAMS_OFFSET..PARAMS_OFFSET + 512].fill(0);
    disk[PARAMS_OFFSET..PARAMS_OFFSET + text.len()].copy_from_slice(text.as_bytes());
    disk.resize(DISK_BYTES as usize, 0);
    driver::attach(spec, &mut disk)?;
    let disk_path = out_dir.join("disk.img");
    fs::write(&disk_path, &disk).map_err(|e| format!("write {}: {e}", disk_path.display()))?;

    let com_port = if spec.serial {
        Some(relay::free_port()?)
    } else {
        None
    };
    let mut bochsrc = format!(
        "megs: 64\n\
         romimage: file={BIOS}, options=fastboot\n\
         vgaromimage: file={VGABIOS}\n\
         cpu: model={model}, count={cpus}, ips={ips}, reset_on_triple_fault=0, ignore_bad_msrs=0\n\
         pci: enabled=1, chipset=i440fx\n\
         ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14\n\
         ata0-master: type=disk, mode=flat, path={disk}, cylinders=20, heads=16, spt=63\n\
         boot: disk\n\
         clock: sync=none, time0=946681200\n\
         display_library: term\n\
         port_e9_hack: enabled=1\n\
         log: {log}\n\
         panic: action=fatal\n\
         error: action=report\n\
         info: action=report\n\
         debug: action=ignore\n",
        model = spec.model,
        cpus = spec.cpus,
        ips = spec.ips,
        disk = disk_path.display(),
        log = out_dir.join("bochs.log").display(),
    );
    if spec.trace_windows > 0 {
        bochsrc.push_str("magic_break: enabled=1\n");
    }
    if let Some(port) = com_port {
        let _ = writeln!(
            bochsrc,
            "com1: enabled=1, mode=socket-server, dev=localhost:{port}"
        );
    }
    let rc_path = out_dir.join("bochsrc");
    fs::write(&rc_path, bochsrc).map_err(|e| format!("write bochsrc: {e}"))?;
    // The debugger is compiled into Debian's Bochs: it waits at a prompt unless told to go on.
    let cont_path = out_dir.join("cont.rc");
    fs::write(&cont_path, spec.debugger_script()).map_err(|e| format!("write cont.rc: {e}"))?;

    let stderr = fs::File::create(out_dir.join("stderr.txt"))
        .map_err(|e| format!("create stderr.txt: {e}"))?;
    let mut cmd = Command::new(BOCHS_BIN);
    cmd.current_dir(&out_dir)
        .args(["-q", "-unlock", "-f"])
        .arg(&rc_path)
        .arg("-rc")
        .arg(&cont_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    // The term display needs a terminal type even headless (it opens its own pty).
    if std::env::var_os("TERM").is_none_or(|t| t.is_empty()) {
        cmd.env("TERM", "dumb");
    }
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("start {BOCHS_BIN}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let console = Arc::new(Mutex::new(String::new()));
    let sink = console.clone();
    // console.txt grows as the machine prints (a hung run can be read while it hangs).
    let mut live = fs::File::create(out_dir.join("console.txt")).ok();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r
            .read_until(b'\n', &mut buf)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            if let Some(f) = live.as_mut() {
                let _ = f.write_all(&buf);
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&String::from_utf8_lossy(&buf));
            buf.clear();
        }
    });
    let mut machine = Machine {
        spec: spec.clone(),
        child,
        console,
        reader: Some(reader),
        out_dir,
        started,
        relay: None,
    };
    if let Some(port) = com_port {
        let relay = relay::Relay::start(port, &mut machine.child, Duration::from_secs(30))
            .map_err(|e| format!("{e}; see {}", machine.out_dir.join("bochs.log").display()))?;
        machine.relay = Some(relay);
    }
    Ok(machine)
}

impl Machine {
    /// What was started.
    pub fn spec(&self) -> &RunSpec {
        &self.spec
    }

    /// The run's directory.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Where `ackctl --machine` reaches the control server (the relay's listening socket).
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(relay::Relay::addr)
    }

    /// `localhost:PORT` for `ackctl --machine`.
    pub fn machine_arg(&self) -> Option<String> {
        self.control_addr()
            .map(|a| format!("localhost:{}", a.port()))
    }

    /// Everything printed so far.
    pub fn console(&self) -> String {
        self.console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether Bochs is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the console has a RESULT line of `scenario`, a fatal line, or Bochs ended.
    pub fn wait_for_result(
        &mut self,
        scenario: &str,
        timeout: Duration,
    ) -> Result<ResultLine, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            let mut lines = console.lines().filter_map(ResultLine::parse);
            if let Some(l) = lines.find(|l| l.scenario == scenario || l.get("fatal").is_some()) {
                if l.get("fatal").is_some() {
                    return Err(format!("the machine failed: {}", l.raw));
                }
                return Ok(l);
            }
            if !self.running() {
                return Err(format!(
                    "Bochs ended without a `RESULT {scenario}` line; console tail:\n{}",
                    tail(&console, 20)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no `RESULT {scenario}` line after {timeout:?}; console tail:\n{}",
                    tail(&console, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Presses the machine's power button: the serve scenario finishes its rounds, closes its
    /// books, prints its RESULT lines and powers off. Send it only when no client is mid-request.
    pub fn finish(&self) -> Result<(), String> {
        match &self.relay {
            Some(r) => r.send_to_machine(FINISH_WORD),
            None => Err("this machine has no serial link".into()),
        }
    }

    /// Waits for Bochs to end (killing it at the spec's timeout) and collects the output.
    pub fn wait(mut self) -> Result<RunOutput, String> {
        let mut timed_out = false;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if self.started.elapsed() > self.spec.timeout => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    timed_out = true;
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("wait for bochs: {e}")),
            }
        }
        Ok(self.collect(timed_out))
    }

    /// Kills Bochs now and collects what it printed.
    pub fn kill(mut self) -> RunOutput {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.collect(false)
    }

    fn collect(&mut self, timed_out: bool) -> RunOutput {
        let wall = self.started.elapsed();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(r) = self.relay.take() {
            r.stop();
        }
        let console = self.console();
        if let Ok(mut f) = fs::File::create(self.out_dir.join("console.txt")) {
            let _ = f.write_all(console.as_bytes());
        }
        let results = console.lines().filter_map(ResultLine::parse).collect();
        RunOutput {
            spec: self.spec.clone(),
            console,
            results,
            out_dir: self.out_dir.clone(),
            wall,
            timed_out,
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.reader.is_some() {
            // Not collected (a test gave up early): keep the console for the post-mortem.
            self.collect(false);
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The word the kernel's control server takes as "finish" (`tests/kernel/src/control.rs`).
const FINISH_WORD: &[u8] = b"ACK!FINISH";

/// Runs `spec` once per process however many tests ask for it (tests of several scenarios
/// judge the same run).
pub fn run_shared(spec: &RunSpec) -> Result<Arc<RunOutput>, String> {
    type Slot = Arc<OnceLock<Result<Arc<RunOutput>, String>>>;
    static RUNS: OnceLock<Mutex<HashMap<RunSpec, Slot>>> = OnceLock::new();
    let slot = {
        let mut map = RUNS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.entry(spec.clone()).or_default().clone()
    };
    slot.get_or_init(|| run(spec).map(Arc::new)).clone()
}

/// Collects failed expectations about one run, then reports them all at once.
pub struct Verdict<'a> {
    run: &'a RunOutput,
    failures: Vec<String>,
}

impl<'a> Verdict<'a> {
    /// Starts judging `run`: it must have finished (an `end=1` line), not timed out, and have
    /// no `fatal` line.
    pub fn new(run: &'a RunOutput) -> Verdict<'a> {
        let mut v = Verdict {
            run,
            failures: Vec::new(),
        };
        let scenario = run.spec.scenario().to_string();
        if run.timed_out {
            v.fail(format!("Bochs timed out after {:?}", run.wall));
        }
        for l in run.results.iter().filter(|l| l.get("fatal").is_some()) {
            v.fail(format!("fatal: {}", l.raw));
        }
        if !run.lines(&scenario, None).any(|l| l.num("end") == Some(1)) {
            v.fail(format!(
                "no `RESULT {scenario} end=1` line: the machine did not finish"
            ));
        }
        v
    }

    /// Records a failure.
    pub fn fail(&mut self, what: String) {
        self.failures
            .push(format!("model {}: {what}", self.run.spec.model));
    }

    /// The line of `scenario` (and `mode`), or a failure.
    pub fn line(&mut self, scenario: &str, mode: Option<&str>) -> Option<&'a ResultLine> {
        let run = self.run;
        let l = run.line(scenario, mode);
        if l.is_none() {
            self.fail(format!(
                "no RESULT line for {scenario}{}",
                mode.map(|m| format!(" mode={m}")).unwrap_or_default()
            ));
        }
        l
    }

    fn field(&mut self, line: &ResultLine, key: &str) -> Option<u64> {
        let v = line.num(key);
        if v.is_none() {
            self.fail(format!(
                "{}: field {key} missing or not a number",
                line.label()
            ));
        }
        v
    }

    /// `key` == `expected`.
    pub fn eq(&mut self, line: &ResultLine, key: &str, expected: u64) -> &mut Self {
        if let Some(got) = self.field(line, key)
            && got != expected
        {
            self.fail(format!(
                "{}: field {key}: expected {expected}, got {got}",
                line.label()
            ));
        }
        self
    }

    /// `key` > `floor`.
    pub fn gt(&mut self, line: &ResultLine, key: &str, floor: u64) -> &mut Self {
        if let Some(got) = self.field(line, key)
            && got <= floor
        {
            self.fail(format!(
                "{}: field {key}: expected more than {floor}, got {got}",
                line.label()
            ));
        }
        self
    }

    /// `key` ≤ `ceiling`.
    pub fn le(&mut self, line: &ResultLine, key: &str, ceiling: u64) -> &mut Self {
        if let Some(got) = self.field(line, key)
            && got > ceiling
        {
            self.fail(format!(
                "{}: field {key}: expected at most {ceiling}, got {got}",
                line.label()
            ));
        }
        self
    }

    /// `key` == the value of `other_key` on the same line.
    pub fn eq_field(&mut self, line: &ResultLine, key: &str, other_key: &str) -> &mut Self {
        if let (Some(got), Some(expected)) = (self.field(line, key), self.field(line, other_key))
            && got != expected
        {
            self.fail(format!(
                "{}: field {key}: expected {expected} (= {other_key}), got {got}",
                line.label()
            ));
        }
        self
    }

    /// The serve machine's own books on its `RESULT serve` summary line, whichever backend
    /// served (the kernel's core or the image): every CPU virtualized and in one mode, every
    /// interrupt raised ran (at least `min_interrupts`), nothing lost, drained or left in
    /// service, no handler in the wrong place, every reply fitted.
    pub fn serve_books_hold(
        &mut self,
        line: &ResultLine,
        cpus: u64,
        min_interrupts: u64,
    ) -> &mut Self {
        self.eq(line, "cpus", cpus)
            .eq(line, "virtualized", cpus)
            .eq(line, "modes_agree", 1);
        for key in [
            "undrained",
            "lost",
            "isr_left",
            "canary_broken",
            "ctx_violations",
            "wrong_idt",
            "unexpected",
            "dpc_in_root",
            "replay_low_cr8",
            "ring3_bad_exits",
            "too_small",
        ] {
            self.eq(line, key, 0);
        }
        self.eq_field(line, "ran", "raised")
            .gt(line, "ran", min_interrupts.saturating_sub(1))
    }

    /// The miniature NT's verifier books after DriverUnload (`ntos::driver::write_books`):
    /// nothing leaked or misused, every IRP completed once and within its buffer, no IRQL rule
    /// broken. One list, so a new book is judged by every scenario that loads the image.
    pub fn nt_books_clean(&mut self, line: &ResultLine) -> &mut Self {
        const BOOKS: [&str; 8] = [
            "leaks",
            "misuses",
            "double_completions",
            "uncompleted",
            "status_mismatches",
            "information_overflows",
            "stray_completions",
            "irql_violations",
        ];
        for key in BOOKS {
            self.eq(line, key, 0);
        }
        self
    }

    /// The failures recorded so far.
    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Panics with every failure, the run's directory and the console's tail.
    pub fn finish(self) {
        if self.failures.is_empty() {
            return;
        }
        panic!(
            "{} failure(s) in {} ({:.1}s):\n  {}\nrun directory: {}\nconsole tail:\n{}",
            self.failures.len(),
            self.run.spec.name(),
            self.run.wall.as_secs_f64(),
            self.failures.join("\n  "),
            self.run.out_dir.display(),
            self.run.tail(25)
        );
    }
}
