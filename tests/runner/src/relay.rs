//! The host end of the test machine's COM1. Bochs's `socket-server` mode accepts exactly one
//! connection, once, while it starts (and runs nothing until then), so the runner holds that
//! connection and relays it: clients (`ackctl --machine localhost:PORT`, the malformed-frame
//! tests) connect to the relay's own listening socket and are served one at a time, in order
//! of connection. Bytes the machine sends while no client is connected are dropped (a late
//! reply to a client that gave up).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A free TCP port on the loopback interface (bound, then released for Bochs to bind).
pub fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("find a free port: {e}"))
}

/// The relay between one Bochs COM1 connection and its clients.
pub struct Relay {
    addr: SocketAddr,
    to_machine: Arc<Mutex<TcpStream>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

type Client = Arc<Mutex<Option<TcpStream>>>;

impl Relay {
    /// Connects to Bochs's COM1 on `com_port` (retrying while Bochs starts; failing if it
    /// exits first) and starts listening for clients on a free loopback port.
    pub fn start(com_port: u16, bochs: &mut Child, wait: Duration) -> Result<Relay, String> {
        let deadline = Instant::now() + wait;
        let machine = loop {
            match TcpStream::connect(("127.0.0.1", com_port)) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = bochs.try_wait() {
                        return Err(format!(
                            "Bochs exited ({status}) before COM1 accepted a connection on port {com_port}"
                        ));
                    }
                    if Instant::now() > deadline {
                        return Err(format!("COM1 on port {com_port} not reachable: {e}"));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        machine
            .set_nodelay(true)
            .map_err(|e| format!("COM1 socket: {e}"))?;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("relay bind: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("relay listener: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("relay address: {e}"))?;
        let from_machine = machine
            .try_clone()
            .map_err(|e| format!("COM1 socket: {e}"))?;
        let to_machine = Arc::new(Mutex::new(machine));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Client = Arc::new(Mutex::new(None));

        let down = {
            let (client, stop) = (client.clone(), stop.clone());
            std::thread::spawn(move || machine_to_client(from_machine, &client, &stop))
        };
        let up = {
            let (client, stop, to_machine) = (client.clone(), stop.clone(), to_machine.clone());
            std::thread::spawn(move || accept_clients(&listener, &client, &to_machine, &stop))
        };
        Ok(Relay {
            addr,
            to_machine,
            stop,
            threads: vec![down, up],
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes `bytes` to the machine directly (the runner's own words, like "finish").
    pub fn send_to_machine(&self, bytes: &[u8]) -> Result<(), String> {
        self.to_machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(bytes)
            .map_err(|e| format!("write to COM1: {e}"))
    }

    /// Stops relaying and closes the machine's connection.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self
            .to_machine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn machine_to_client(mut from_machine: TcpStream, client: &Client, stop: &AtomicBool) {
    let _ = from_machine.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Acquire) {
        match from_machine.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut c = client.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(stream) = c.as_mut()
                    && stream.write_all(&buf[..n]).is_err()
                {
                    *c = None;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn accept_clients(
    listener: &TcpListener,
    client: &Client,
    to_machine: &Mutex<TcpStream>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let Ok(mut reader) = stream.try_clone() else {
            continue;
        };
        *client.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        let mut buf = [0u8; 4096];
        while !stop.load(Ordering::Acquire) {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut m = to_machine.lock().unwrap_or_else(|e| e.into_inner());
                    if m.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
        *client.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
