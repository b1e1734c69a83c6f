//! Test harness: every kernel test runs on a thread of its own in fresh network and mount
//! namespaces, with `lo` up, IPv6 test addresses on `lo`, and a private bpffs. Nothing it does
//! reaches the host's namespaces: sockets, sysctls and pins die with the thread's namespaces.

#![allow(dead_code)]

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};
use socket2::{Domain, Protocol, SockRef, Socket, Type};

mod generations;
#[allow(unused_imports)] // not every test binary uses them
pub use generations::*;

/// How many IPv6 test addresses (`fd00::1` … ) are put on `lo`.
pub const V6_ADDRS: u16 = 64;

/// The IPv6 test address number `i` (1-based).
pub fn v6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)
}

/// A fresh namespace set for one test.
pub struct Ns {
    /// A private bpffs mount, empty at the start.
    pub bpffs: PathBuf,
}

/// Runs `f` in fresh namespaces. Fails when not root: the tests are ignored unless asked for,
/// and one asked for must run.
pub fn run<R: Send + 'static>(test: &str, f: impl FnOnce(&Ns) -> R + Send + 'static) -> R {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{test} needs root (network namespace, bpffs mount, eBPF): it cannot run as this user"
    );
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ipcluster-steer-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let thread_dir = dir.clone();
    let out = std::thread::spawn(move || {
        // CLONE_NEWNET and CLONE_NEWNS act on this thread only (CLONE_NEWNS unshares its
        // filesystem context from the process's other threads).
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare");
        // Private first, so that no mount made here propagates to the host.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .expect("make / private");
        std::fs::create_dir(&thread_dir).expect("mkdir test bpffs mountpoint");
        let _cleanup = Cleanup(thread_dir.clone());
        assert!(
            ipcluster_steer::mount_bpffs_if_absent(&thread_dir).expect("mount bpffs"),
            "a fresh directory was already a bpffs"
        );
        assert!(!ipcluster_steer::mount_bpffs_if_absent(&thread_dir).unwrap(), "second mount");
        lo_up().expect("bring lo up");
        for i in 1..=V6_ADDRS {
            add_v6(v6(i)).expect("add an IPv6 address to lo");
        }
        f(&Ns { bpffs: thread_dir.clone() })
    })
    .join();
    // The mount went with the thread's mount namespace; the directory is on the host's /tmp.
    let _ = std::fs::remove_dir(&dir);
    match out {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

// rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/if_addr.h).
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x02;
const RT_SCOPE_HOST: u8 = 254;
/// `lo` is the first device of every network namespace.
const LO_INDEX: i32 = 1;

/// Sends one rtnetlink request and waits for its acknowledgement.
fn rtnl(msg_type: u16, flags: u16, payload: &[u8]) -> io::Result<()> {
    let sock =
        Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(libc::NETLINK_ROUTE)))?;
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&msg_type.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns ours
    msg.extend_from_slice(payload);
    // Unconnected netlink sockets send to the kernel (port id 0) and bind themselves.
    sock.send(&msg)?;
    let mut buf = [0u8; 4096];
    let n = (&sock).read(&mut buf)?;
    let ty = u16::from_ne_bytes([buf[4], buf[5]]);
    if n < 20 || ty != NLMSG_ERROR {
        return Err(io::Error::other(format!("unexpected netlink answer type {ty}")));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

/// `ip link set lo up`.
fn lo_up() -> io::Result<()> {
    // struct ifinfomsg { family, pad, type, index, flags, change }
    let mut p = vec![libc::AF_UNSPEC as u8, 0];
    p.extend_from_slice(&0u16.to_ne_bytes());
    p.extend_from_slice(&LO_INDEX.to_ne_bytes());
    p.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    p.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
    rtnl(RTM_NEWLINK, 0, &p)
}

/// `ip addr add <addr>/128 dev lo nodad`: usable at once (no tentative state).
fn add_v6(addr: Ipv6Addr) -> io::Result<()> {
    // struct ifaddrmsg { family, prefixlen, flags, scope, index } + rtattr IFA_LOCAL
    let mut p = vec![libc::AF_INET6 as u8, 128, IFA_F_NODAD, RT_SCOPE_HOST];
    p.extend_from_slice(&(LO_INDEX as u32).to_ne_bytes());
    p.extend_from_slice(&(4u16 + 16).to_ne_bytes());
    p.extend_from_slice(&IFA_LOCAL.to_ne_bytes());
    p.extend_from_slice(&addr.octets());
    rtnl(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &p)
}

/// `ip addr add <addr>/32 dev lo`: one more local IPv4 address, outside 127/8.
pub fn add_v4(addr: Ipv4Addr) -> io::Result<()> {
    let mut p = vec![libc::AF_INET as u8, 32, 0, RT_SCOPE_HOST];
    p.extend_from_slice(&(LO_INDEX as u32).to_ne_bytes());
    p.extend_from_slice(&(4u16 + 4).to_ne_bytes());
    p.extend_from_slice(&IFA_LOCAL.to_ne_bytes());
    p.extend_from_slice(&addr.octets());
    rtnl(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &p)
}

/// A client connected from `src` (an ephemeral port) to `dst`.
pub fn connect(src: IpAddr, dst: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// The local address of a client, IPv4-mapped addresses as IPv4.
pub fn local(s: &Socket) -> SocketAddr {
    canonical(s.local_addr().unwrap().as_socket().unwrap())
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Lets the tests poll listeners with accept. (The O_NONBLOCK flag is the test's choice, not the
/// crate's: production sockets stay blocking for the workers.)
pub fn nonblocking(fd: &OwnedFd) {
    SockRef::from(fd).set_nonblocking(true).unwrap();
}

/// Accepts one connection from `listener` (non-blocking), waiting up to `wait`.
pub fn accept_within(listener: &OwnedFd, wait: Duration) -> Option<(Socket, SocketAddr)> {
    let deadline = Instant::now() + wait;
    loop {
        match SockRef::from(listener).accept() {
            Ok((s, peer)) => return Some((s, canonical(peer.as_socket().unwrap()))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The index of the listener that got `client`'s connection (accepting it). Panics when none
/// did within 5 s, or when a listener holds a connection from someone else.
pub fn accepted_by(listeners: &[&OwnedFd], client: &Socket) -> usize {
    let me = local(client);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (i, l) in listeners.iter().enumerate() {
            match SockRef::from(*l).accept() {
                Ok((_, peer)) => {
                    let peer = canonical(peer.as_socket().unwrap());
                    assert_eq!(peer, me, "listener {i} held a stray connection");
                    return i;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert!(Instant::now() < deadline, "no listener got the connection from {me}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many connections wait in a listener's accept queue (`tcpi_unacked` of a listener).
pub fn queued(listener: &impl AsFd) -> u32 {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is writable for `len` bytes and `len` is a live socklen_t.
    let ret = unsafe {
        libc::getsockopt(
            listener.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(ret, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_unacked
}

/// Waits until `listener` has exactly `n` connections queued (handshakes complete).
pub fn wait_queued(listener: &impl AsFd, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while queued(listener) != n {
        assert!(Instant::now() < deadline, "accept queue holds {} connections, want {n}", queued(listener));
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Checks that the connection between `client` and the accepted `server` carries data both
/// ways (it was neither reset nor refused).
pub fn talk(client: &Socket, server: &Socket) {
    server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&*client).write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    (&*server).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    (&*server).write_all(b"pong").unwrap();
    (&*client).read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

/// IPv4 loopback source number `i`: 127.0.(i >> 8).(i & 255).
pub fn v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x7f00_0000 | i)
}

/// Lifts the soft limit on open files to the hard limit (the cutover test holds ~1300 sockets
/// while other tests run in the same process).
pub fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}
