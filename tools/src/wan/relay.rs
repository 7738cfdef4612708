//! The sockets and threads of the relay.
//!
//! Threads and blocking std sockets rather than tokio: each direction is a pipeline of one
//! receiving and one sending thread joined by a lock-free SPSC ring (`ring`). A blocking
//! `recv` and a `sleep` until the head's delivery time are the cheapest ways to wait (one
//! syscall each, no reactor or wakers), the sender hands the datagrams that are due to
//! `sendmmsg` 32 at a time, and the hot path allocates nothing and takes no lock. Profiles show nearly all
//! of the relay's CPU time inside the kernel's UDP path, so a runtime could not save much, and
//! tokio's timer would round delivery times to whole milliseconds.
//!
//! - `client_to_server`: the listen socket's receiver (`recv_from`, blocking) looks up or opens
//!   the client's upstream socket (connected to `--to`), runs the link model and queues the
//!   datagram; its sender sends it from the client's upstream socket when due.
//! - `server_to_client`: one receiver waits with epoll on every upstream socket and reads with
//!   `MSG_DONTWAIT` (the sockets stay blocking for the other direction's sender); its sender
//!   sends from the listen socket to the client's address when due.
//!
//! Clients are never forgotten (tests and benchmarks open a handful); at most `MAX_CLIENTS`
//! upstream sockets are opened and datagrams from further source addresses are dropped and
//! counted.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use super::args::Config;
use super::link::{Link, Verdict};
use super::ring::{self, Consumer, Producer, MAX_DATAGRAM, RESERVE};

/// Upstream sockets opened at most (each is a file descriptor and kernel buffers).
pub const MAX_CLIENTS: usize = 256;
/// Socket buffer size asked for, so that bursts at several Gbit/s are not dropped by the
/// kernel before the relay reads them. Needs root (SO_*BUFFORCE) or a high net.core.*mem_max.
const SOCKET_BUFFER: usize = 32 << 20;
/// Without `--rate`, the relay's buffer is sized as if the link carried this much.
const ASSUMED_UNLIMITED_BITS_PER_S: f64 = 10e9;

/// Counters written by a receiving thread.
#[derive(Default)]
#[repr(align(128))]
pub struct RxCounters {
    pub received_datagrams: AtomicU64,
    pub received_bytes: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
    /// The relay's own buffer was full (see `--buffer-mib`): not part of the emulated link.
    pub dropped_buffer: AtomicU64,
}

/// Counters written by a sending thread.
#[derive(Default)]
#[repr(align(128))]
pub struct TxCounters {
    pub forwarded_datagrams: AtomicU64,
    pub forwarded_bytes: AtomicU64,
    pub send_errors: AtomicU64,
    /// Held by the sender from a `sendmmsg` until its datagrams are counted, so that a
    /// snapshot taken under it counts every datagram a receiver may already have.
    sending: Mutex<()>,
}

#[derive(Default)]
pub struct DirStats {
    pub rx: RxCounters,
    pub tx: TxCounters,
}

#[derive(Default)]
pub struct Stats {
    pub client_to_server: DirStats,
    pub server_to_client: DirStats,
    pub clients: AtomicU64,
    /// Datagrams from a new client address for which no upstream socket could be opened.
    pub dropped_no_upstream: AtomicU64,
}

impl Stats {
    /// The counters as one JSON object, taken between two send batches of each direction
    /// (waiting at most about half a second for a sender stuck in a send).
    pub fn to_json(&self) -> String {
        let deadline = Instant::now() + Duration::from_millis(500);
        let _c2s = hold(&self.client_to_server.tx.sending, deadline);
        let _s2c = hold(&self.server_to_client.tx.sending, deadline);
        self.format_json()
    }

    /// The counters as they are now, without waiting for the senders (a time-series sample
    /// may be off by the datagrams of one batch), with `t_s` first.
    pub fn sample_json(&self, t_s: f64) -> String {
        format!("{{\"t_s\":{t_s:.3},{}", &self.format_json()[1..])
    }

    fn format_json(&self) -> String {
        let dir = |d: &DirStats| {
            let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
            format!(
                "{{\"received_datagrams\":{},\"received_bytes\":{},\"forwarded_datagrams\":{},\
                 \"forwarded_bytes\":{},\"dropped_loss\":{},\"dropped_queue\":{},\
                 \"dropped_buffer\":{},\"send_errors\":{}}}",
                r(&d.rx.received_datagrams),
                r(&d.rx.received_bytes),
                r(&d.tx.forwarded_datagrams),
                r(&d.tx.forwarded_bytes),
                r(&d.rx.dropped_loss),
                r(&d.rx.dropped_queue),
                r(&d.rx.dropped_buffer),
                r(&d.tx.send_errors),
            )
        };
        format!(
            "{{\"client_to_server\":{},\"server_to_client\":{},\"clients\":{},\"dropped_no_upstream\":{}}}",
            dir(&self.client_to_server),
            dir(&self.server_to_client),
            self.clients.load(Ordering::Relaxed),
            self.dropped_no_upstream.load(Ordering::Relaxed),
        )
    }
}

/// Locks `lock`, giving up at `deadline`.
fn hold(lock: &Mutex<()>, deadline: Instant) -> Option<MutexGuard<'_, ()>> {
    loop {
        match lock.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => thread::yield_now(),
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

/// Adds to a counter that only the calling thread writes (no locked read-modify-write).
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

struct Client {
    /// The client's address in the form `sendmmsg` takes (replies go there).
    sockaddr: libc::sockaddr_storage,
    socklen: libc::socklen_t,
    upstream: UdpSocket,
}

/// The clients in order of arrival; only appended to, so an index stays valid forever.
type Shared = Arc<Mutex<Vec<Arc<Client>>>>;

/// A thread's copy of the client list, refreshed when it meets an index it does not know.
struct ClientView {
    shared: Shared,
    local: Vec<Arc<Client>>,
}

impl ClientView {
    fn new(shared: Shared) -> Self {
        ClientView {
            shared,
            local: Vec::new(),
        }
    }

    fn get(&mut self, index: u32) -> Option<&Client> {
        let index = index as usize;
        if index >= self.local.len() {
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            self.local.clone_from(&shared);
        }
        self.local.get(index).map(|c| &**c)
    }
}

/// Wakes a sending thread that found its ring empty.
struct Doorbell {
    waiting: Arc<AtomicBool>,
    thread: Thread,
}

impl Doorbell {
    /// Called by the producer after each commit.
    fn ring(&self) {
        // Pairs with the fence in `send_loop`: either the sender sees the new tail, or this
        // sees `waiting` (Dekker); an `unpark` before the `park` is not lost.
        fence(Ordering::SeqCst);
        if self.waiting.load(Ordering::Relaxed) {
            self.thread.unpark();
        }
    }
}

/// A running relay. Its threads run until the process exits.
pub struct Relay {
    pub local_addr: SocketAddr,
    pub stats: Arc<Stats>,
}

/// Buffer per direction: twice the bytes the link can hold in flight plus queue (records
/// have headers and padding), within [8 MiB, 1 GiB] unless `--buffer-mib` says otherwise.
pub fn ring_capacity(config: &Config) -> usize {
    if let Some(bytes) = config.buffer_bytes {
        return bytes;
    }
    let link = &config.link;
    let (bits_per_s, queue_ns) = match link.rate_bits_per_s {
        Some(rate) => (rate as f64, link.queue_ns),
        None => (ASSUMED_UNLIMITED_BITS_PER_S, 0),
    };
    // 10 ms of slack for the sending thread being descheduled.
    let hold_s = (link.delay_ns + link.jitter_ns + queue_ns) as f64 / 1e9 + 0.010;
    let want = 2.0 * bits_per_s / 8.0 * hold_s + (4 * RESERVE) as f64;
    want.clamp((8 << 20) as f64, (1 << 30) as f64) as usize
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<Thread, String> {
    thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|h| h.thread().clone())
        .map_err(|e| format!("cannot start thread {name}: {e}"))
}

/// Starts a sending thread and returns the doorbell its producer rings.
fn spawn_sender(
    name: &str,
    consumer: Consumer,
    base: Instant,
    stats: Arc<Stats>,
    counters: fn(&Stats) -> &TxCounters,
    view: ClientView,
    reply_from: Option<Arc<UdpSocket>>,
) -> Result<Doorbell, String> {
    let waiting = Arc::new(AtomicBool::new(false));
    let flag = waiting.clone();
    let thread = spawn(name, move || {
        let outlet = Outlet::new(view, reply_from.as_deref().map(AsRawFd::as_raw_fd));
        send_loop(consumer, &flag, base, counters(&stats), outlet)
    })?;
    Ok(Doorbell { waiting, thread })
}

/// Binds the listen socket and starts the four threads.
pub fn start(config: &Config) -> Result<Relay, String> {
    let listen = UdpSocket::bind(config.listen)
        .map_err(|e| format!("--listen {}: cannot bind: {e}", config.listen))?;
    let local_addr = listen
        .local_addr()
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    let granted = set_buffers(listen.as_raw_fd());
    if granted < SOCKET_BUFFER {
        eprintln!(
            "mover-wan: note: socket buffers are {} KiB, not {} KiB; raise net.core.rmem_max \
             and wmem_max (or run as root) if the relay drops datagrams under load",
            granted >> 10,
            SOCKET_BUFFER >> 10
        );
    }
    let listen = Arc::new(listen);
    // SAFETY: plain syscall; the result is checked.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(format!("epoll_create1: {}", io::Error::last_os_error()));
    }
    // SAFETY: `epoll` is a new descriptor owned by nobody else.
    let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epoll) });
    let stats = Arc::new(Stats::default());
    let shared: Shared = Arc::new(Mutex::new(Vec::new()));
    let capacity = ring_capacity(config);
    let base = Instant::now();

    // client -> server: listen socket -> ring -> the client's upstream socket.
    let (producer, consumer) = ring::channel(capacity);
    let doorbell = spawn_sender(
        "wan-c2s-send",
        consumer,
        base,
        stats.clone(),
        |s| &s.client_to_server.tx,
        ClientView::new(shared.clone()),
        None,
    )?;
    let upstreams = Upstreams {
        to: config.to,
        by_addr: HashMap::new(),
        shared: shared.clone(),
        epoll: epoll.clone(),
        stats: stats.clone(),
        warned: false,
    };
    {
        let (listen, stats) = (listen.clone(), stats.clone());
        let link = Link::new(config.link, config.seed);
        spawn("wan-c2s-recv", move || {
            listen_loop(&listen, upstreams, producer, link, &doorbell, base, &stats)
        })?;
    }

    // server -> client: upstream sockets -> ring -> listen socket.
    let (producer, consumer) = ring::channel(capacity);
    let doorbell = spawn_sender(
        "wan-s2c-send",
        consumer,
        base,
        stats.clone(),
        |s| &s.server_to_client.tx,
        ClientView::new(shared.clone()),
        Some(listen.clone()),
    )?;
    {
        let stats = stats.clone();
        // Another seed, so the two directions do not lose the same datagram numbers.
        let link = Link::new(config.link, config.seed ^ 0x9e37_79b9_7f4a_7c15);
        let view = ClientView::new(shared);
        spawn("wan-s2c-recv", move || {
            upstream_loop(&epoll, view, producer, link, &doorbell, base, &stats)
        })?;
    }
    Ok(Relay { local_addr, stats })
}

/// The client table as the listen socket's receiver keeps it: it alone opens upstreams.
struct Upstreams {
    to: SocketAddr,
    by_addr: HashMap<SocketAddr, u32>,
    shared: Shared,
    epoll: Arc<OwnedFd>,
    stats: Arc<Stats>,
    warned: bool,
}

impl Upstreams {
    /// The index of the client at `addr`, opening its upstream socket on first sight.
    fn index(&mut self, addr: SocketAddr) -> Option<u32> {
        if let Some(&index) = self.by_addr.get(&addr) {
            return Some(index);
        }
        match self.open(addr) {
            Ok(index) => {
                self.by_addr.insert(addr, index);
                bump(&self.stats.clients, 1);
                Some(index)
            }
            Err(e) => {
                if !self.warned {
                    eprintln!("mover-wan: dropping datagrams from {addr}: {e}");
                    self.warned = true;
                }
                bump(&self.stats.dropped_no_upstream, 1);
                None
            }
        }
    }

    fn open(&mut self, addr: SocketAddr) -> Result<u32, String> {
        if self.by_addr.len() >= MAX_CLIENTS {
            return Err(format!(
                "already {MAX_CLIENTS} clients, the most the relay serves"
            ));
        }
        let any: SocketAddr = if self.to.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let upstream = UdpSocket::bind(any)
            .and_then(|s| s.connect(self.to).map(|()| s))
            .map_err(|e| format!("cannot open an upstream socket to {}: {e}", self.to))?;
        set_buffers(upstream.as_raw_fd());
        let fd = upstream.as_raw_fd();
        let index = {
            let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            let (sockaddr, socklen) = raw_sockaddr(addr);
            shared.push(Arc::new(Client {
                sockaddr,
                socklen,
                upstream,
            }));
            (shared.len() - 1) as u32
        };
        // Registered after it is in the shared list, so the epoll thread finds it.
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: u64::from(index),
        };
        // SAFETY: both descriptors are open (the client is never removed) and `event` is valid.
        let r =
            unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) };
        if r != 0 {
            // The client stays in the list (indices must not move) but gets no replies.
            return Err(format!("epoll_ctl: {}", io::Error::last_os_error()));
        }
        Ok(index)
    }
}

/// Errors a UDP receive may report that say nothing about the socket's health: interrupted,
/// an ICMP error for an earlier send (port unreachable), transient memory shortage.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS | libc::ENOMEM | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

fn fatal(what: &str, e: &io::Error) -> ! {
    eprintln!("mover-wan: {what}: {e}");
    std::process::exit(1)
}

/// Receives, runs the link model and queues one datagram's verdict.
#[allow(clippy::too_many_arguments)]
fn admit(
    len: usize,
    stored: bool,
    client: Option<u32>,
    producer: &mut Producer,
    link: &mut Link,
    doorbell: &Doorbell,
    base: Instant,
    rx: &RxCounters,
) {
    bump(&rx.received_datagrams, 1);
    bump(&rx.received_bytes, len as u64);
    let Some(client) = client else { return };
    if !stored {
        bump(&rx.dropped_buffer, 1);
        return;
    }
    let now = base.elapsed().as_nanos() as u64;
    match link.admit(now, len) {
        Verdict::Deliver(at) => {
            producer.commit(len, client, at);
            doorbell.ring();
        }
        Verdict::DropQueue => bump(&rx.dropped_queue, 1),
        Verdict::DropLoss => bump(&rx.dropped_loss, 1),
    }
}

/// client -> server receiver: the listen socket, blocking.
fn listen_loop(
    listen: &UdpSocket,
    mut upstreams: Upstreams,
    mut producer: Producer,
    mut link: Link,
    doorbell: &Doorbell,
    base: Instant,
    stats: &Stats,
) {
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut last: Option<(SocketAddr, u32)> = None;
    let mut errors = 0u32;
    loop {
        let (received, stored) = match producer.reserve() {
            Some(space) => (listen.recv_from(space), true),
            None => (listen.recv_from(&mut scratch), false),
        };
        let (len, from) = match received {
            Ok(r) => {
                errors = 0;
                r
            }
            Err(e) if transient(&e) => continue,
            Err(e) => {
                errors += 1;
                if errors > 1000 {
                    fatal("receiving on the listen socket", &e);
                }
                continue;
            }
        };
        let client = match last {
            Some((addr, index)) if addr == from => Some(index),
            _ => {
                let index = upstreams.index(from);
                last = index.map(|i| (from, i));
                index
            }
        };
        admit(
            len,
            stored,
            client,
            &mut producer,
            &mut link,
            doorbell,
            base,
            &stats.client_to_server.rx,
        );
    }
}

/// server -> client receiver: every upstream socket, through epoll.
fn upstream_loop(
    epoll: &OwnedFd,
    mut view: ClientView,
    mut producer: Producer,
    mut link: Link,
    doorbell: &Doorbell,
    base: Instant,
    stats: &Stats,
) {
    const EVENTS: usize = 64;
    /// Datagrams read from one socket before looking at the others again.
    const BURST: usize = 64;
    let mut scratch = vec![0u8; MAX_DATAGRAM];
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    loop {
        // SAFETY: `events` holds EVENTS entries and outlives the call.
        let n = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                EVENTS as libc::c_int,
                -1,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            fatal("epoll_wait", &e);
        }
        for event in &events[..n as usize] {
            let index = { event.u64 } as u32;
            let Some(client) = view.get(index) else {
                continue;
            };
            let fd = client.upstream.as_raw_fd();
            for _ in 0..BURST {
                let (received, stored) = match producer.reserve() {
                    Some(space) => (recv_nowait(fd, space), true),
                    None => (recv_nowait(fd, &mut scratch), false),
                };
                match received {
                    Ok(len) => admit(
                        len,
                        stored,
                        Some(index),
                        &mut producer,
                        &mut link,
                        doorbell,
                        base,
                        &stats.server_to_client.rx,
                    ),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if transient(&e) => continue,
                    Err(_) => break,
                }
            }
        }
    }
}

/// `recv` that does not block, leaving the socket itself blocking for its sender.
fn recv_nowait(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Datagrams handed to one `sendmmsg` at most.
const BATCH: usize = 32;
/// The shortest sleep of a sender. When the next datagram is due sooner, the sender still
/// sleeps this long and then sends everything due in one batch: at 1 Gbit/s datagrams are due
/// every 11 µs, and a wake-up each would cost more than the sends. Datagrams leave at most
/// about this much late, which is small beside the delays emulated.
const MIN_SLEEP: Duration = Duration::from_micros(50);

/// The sending half of a direction: sends the records whose delivery time has come, in
/// batches, and sleeps until the next one is due.
fn send_loop(
    mut consumer: Consumer,
    waiting: &AtomicBool,
    base: Instant,
    counters: &TxCounters,
    mut outlet: Outlet,
) {
    set_timer_slack();
    loop {
        if !consumer.refresh() {
            waiting.store(true, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            if consumer.is_empty() {
                // The timeout only bounds the wait should a wake-up ever be missed.
                thread::park_timeout(Duration::from_millis(100));
            }
            waiting.store(false, Ordering::Relaxed);
            continue;
        }
        let now = base.elapsed().as_nanos() as u64;
        let mut pos = consumer.head();
        let mut next_due = None;
        while outlet.len < BATCH {
            let Some((record, next)) = consumer.get(pos) else {
                break;
            };
            if record.deliver_ns > now {
                next_due = Some(record.deliver_ns);
                break;
            }
            outlet.push(record.client, record.payload);
            pos = next;
        }
        if outlet.len > 0 {
            let counting = counters.sending.lock().unwrap_or_else(|e| e.into_inner());
            outlet.flush(counters);
            drop(counting);
            consumer.release(pos);
        } else if let Some(due) = next_due {
            thread::sleep(Duration::from_nanos(due - now).max(MIN_SLEEP));
        }
    }
}

/// A batch of datagrams for `sendmmsg`, in preallocated arrays that point into the ring.
/// Built on the sending thread (it holds raw pointers, so it is not `Send`).
struct Outlet {
    view: ClientView,
    /// None: from each client's upstream socket (connected to `--to`); Some: from the listen
    /// socket to each client's address.
    reply_from: Option<RawFd>,
    msgs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    fds: Vec<RawFd>,
    len: usize,
}

impl Outlet {
    fn new(view: ClientView, reply_from: Option<RawFd>) -> Self {
        let mut iovs = vec![
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0
            };
            BATCH
        ];
        let msgs = (0..BATCH)
            .map(|i| {
                // SAFETY: mmsghdr is plain data for which all zeroes is valid (null pointers).
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                // The iovec array is never resized, so this pointer stays valid.
                m.msg_hdr.msg_iov = &mut iovs[i];
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        Outlet {
            view,
            reply_from,
            msgs,
            iovs,
            fds: vec![-1; BATCH],
            len: 0,
        }
    }

    /// Adds a datagram; `payload` must stay valid until `flush`.
    fn push(&mut self, client: u32, payload: &[u8]) {
        let Some(c) = self.view.get(client) else {
            // Cannot happen (indices are published after their client); sent nowhere.
            return;
        };
        let i = self.len;
        self.iovs[i].iov_base = payload.as_ptr() as *mut libc::c_void;
        self.iovs[i].iov_len = payload.len();
        let hdr = &mut self.msgs[i].msg_hdr;
        match self.reply_from {
            Some(fd) => {
                // Clients are never dropped (`Arc` in the view), so the address stays put.
                hdr.msg_name = &c.sockaddr as *const libc::sockaddr_storage as *mut libc::c_void;
                hdr.msg_namelen = c.socklen;
                self.fds[i] = fd;
            }
            None => {
                hdr.msg_name = std::ptr::null_mut();
                hdr.msg_namelen = 0;
                self.fds[i] = c.upstream.as_raw_fd();
            }
        }
        self.len += 1;
    }

    /// Sends the batch, one `sendmmsg` per run of datagrams leaving by the same socket.
    fn flush(&mut self, counters: &TxCounters) {
        let (mut sent, mut bytes, mut errors) = (0u64, 0u64, 0u64);
        let mut i = 0;
        while i < self.len {
            let fd = self.fds[i];
            let mut end = i + 1;
            while end < self.len && self.fds[end] == fd {
                end += 1;
            }
            // SAFETY: msgs[i..end] are initialised and point at iovecs and addresses that
            // outlive the call (see `push`).
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.msgs.as_mut_ptr().add(i),
                    (end - i) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                let r = r as usize;
                sent += r as u64;
                bytes += self.iovs[i..i + r]
                    .iter()
                    .map(|v| v.iov_len as u64)
                    .sum::<u64>();
                i += r;
            } else if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            } else {
                // The datagram at `i` failed (for example ICMP port unreachable reported on the
                // connected upstream socket); skip it and send the rest.
                errors += 1;
                i += 1;
            }
        }
        self.len = 0;
        bump(&counters.forwarded_datagrams, sent);
        bump(&counters.forwarded_bytes, bytes);
        bump(&counters.send_errors, errors);
    }
}

/// `addr` as a C socket address.
fn raw_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data for which all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Asks for both buffers of a socket to be `SOCKET_BUFFER` bytes, forcing past the sysctl
/// limits where allowed; returns the smaller size the kernel granted (it reports double).
fn set_buffers(fd: RawFd) -> usize {
    let mut granted = usize::MAX;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let size = SOCKET_BUFFER as libc::c_int;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let set = |opt| {
            // SAFETY: `size` outlives the call and `len` is its size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    len,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
        let mut got: libc::c_int = 0;
        let mut got_len = len;
        // SAFETY: `got` and `got_len` outlive the call and describe an int.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                plain,
                (&mut got as *mut libc::c_int).cast(),
                &mut got_len,
            )
        };
        let got = if r == 0 { (got.max(0) as usize) / 2 } else { 0 };
        granted = granted.min(got);
    }
    granted
}

/// Lets `sleep` wake within about a microsecond of the delivery time (default slack: 50 µs).
fn set_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long; failure only leaves the default.
    unsafe {
        libc::prctl(
            libc::PR_SET_TIMERSLACK,
            1000 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::LinkParams;

    fn config(link: LinkParams, buffer_bytes: Option<usize>) -> Config {
        Config {
            listen: ([127, 0, 0, 1], 0).into(),
            to: ([127, 0, 0, 1], 9).into(),
            link,
            buffer_bytes,
            seed: 1,
            json_stats: false,
            stats_every: None,
        }
    }

    #[test]
    fn buffer_holds_what_the_link_holds() {
        const MS: u64 = 1_000_000;
        // 1 Gbit/s for 25 ms + 100 ms of queue + 10 ms: 16.9 MB, doubled.
        let rated = LinkParams {
            delay_ns: 25 * MS,
            rate_bits_per_s: Some(1_000_000_000),
            ..LinkParams::default()
        };
        let bytes = ring_capacity(&config(rated, None));
        assert!((33_000_000..35_000_000).contains(&bytes), "{bytes}");
        // Unlimited: sized for 10 Gbit/s over delay + jitter + 10 ms; the queue does not count.
        let unlimited = LinkParams {
            delay_ns: 25 * MS,
            ..LinkParams::default()
        };
        let bytes = ring_capacity(&config(unlimited, None));
        assert!((87_000_000..89_000_000).contains(&bytes), "{bytes}");
        assert_eq!(
            ring_capacity(&config(LinkParams::default(), Some(3 << 20))),
            3 << 20
        );
        let slow = LinkParams {
            rate_bits_per_s: Some(1_000),
            ..LinkParams::default()
        };
        assert_eq!(ring_capacity(&config(slow, None)), 8 << 20);
        let huge = LinkParams {
            delay_ns: 60_000 * MS,
            ..LinkParams::default()
        };
        assert_eq!(ring_capacity(&config(huge, None)), 1 << 30);
    }

    #[test]
    fn socket_addresses_convert() {
        let (raw, len) = raw_sockaddr("127.0.0.1:4433".parse().unwrap());
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in>());
        // SAFETY: raw_sockaddr wrote a sockaddr_in.
        let sin: libc::sockaddr_in =
            unsafe { std::ptr::read((&raw as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin.sin_family as i32, libc::AF_INET);
        assert_eq!(u16::from_be(sin.sin_port), 4433);
        assert_eq!(sin.sin_addr.s_addr.to_ne_bytes(), [127, 0, 0, 1]);
        let (raw, len) = raw_sockaddr("[::1]:9".parse().unwrap());
        assert_eq!(len as usize, std::mem::size_of::<libc::sockaddr_in6>());
        // SAFETY: raw_sockaddr wrote a sockaddr_in6.
        let sin6: libc::sockaddr_in6 =
            unsafe { std::ptr::read((&raw as *const libc::sockaddr_storage).cast()) };
        assert_eq!(sin6.sin6_family as i32, libc::AF_INET6);
        assert_eq!(u16::from_be(sin6.sin6_port), 9);
        assert_eq!(
            sin6.sin6_addr.s6_addr,
            std::net::Ipv6Addr::LOCALHOST.octets()
        );
    }
}
