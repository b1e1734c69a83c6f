//! The notify receiver's tests: parsing, the kernel's sender PID, and the [`Gate`]'s filtering,
//! coalescing and forgetting.

use super::*;

#[test]
fn parses_assignments() {
    let m = parse(b"READY=1\nSTATUS=serving 3 clients\nMAINPID=4\n");
    assert!(m.ready && !m.watchdog);
    assert!(parse(b"WATCHDOG=1").watchdog);
    assert!(!parse(b"READY=0").ready);
    assert_eq!(parse(b"\xff\xfe garbage"), Message::default());
}

mod props {
    use ipcluster_core::prop_config::{config, mutated_bytes};
    use proptest::prelude::*;

    use super::super::{MAX_DATAGRAM, Message, parse};

    /// `m` as a sender writes it (sd_notify(3)): its assignments among `others`, one a
    /// line, the last line ended or not.
    fn datagram(m: &Message, others: &[String], at: usize, end: bool) -> Vec<u8> {
        let mut lines: Vec<String> = others.to_vec();
        let said = [(m.ready, "READY=1"), (m.watchdog, "WATCHDOG=1")];
        for (_, line) in said.into_iter().filter(|(on, _)| *on) {
            lines.insert(at % (lines.len() + 1), line.to_owned());
        }
        let mut text = lines.join("\n");
        if end {
            text.push('\n');
        }
        text.into_bytes()
    }

    /// Other assignments a sender may add (none of them one the daemon acts on).
    fn others() -> impl Strategy<Value = Vec<String>> {
        let line = prop_oneof![
            "(STATUS|MAINPID|RELOADING|STOPPING|ERRNO|EXTEND_TIMEOUT_USEC)=[ -~]{0,20}",
            Just("READY=0".to_owned()),
            Just("WATCHDOG=trigger".to_owned()),
            Just("READY=1 ".to_owned()),
            Just(String::new()),
        ];
        prop::collection::vec(line, 0..4)
    }

    fn message() -> impl Strategy<Value = Message> {
        (any::<bool>(), any::<bool>()).prop_map(|(ready, watchdog)| Message { ready, watchdog })
    }

    const LINES: [&[u8]; 7] =
        [b"READY=1", b"WATCHDOG=1", b"READY=0", b"READY=1 ", b"\n", b"\xff", b"STATUS=x"];

    proptest! {
        #![proptest_config(config(1024))]

        /// Any datagram (at most MAX_DATAGRAM bytes, as recv reads them): no panic, and
        /// exactly the lines `READY=1` and `WATCHDOG=1` count.
        #[test]
        fn any_datagram_is_parsed_without_panicking(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..MAX_DATAGRAM),
            prop::collection::vec(prop::sample::select(LINES.to_vec()), 0..20).prop_map(|p| p.concat()),
            mutated_bytes((message(), others(), 0usize..8, any::<bool>())
                .prop_map(|(m, o, at, end)| datagram(&m, &o, at, end))),
        ]) {
            let m = parse(&bytes);
            let lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
            prop_assert_eq!(m.ready, lines.contains(&&b"READY=1"[..]));
            prop_assert_eq!(m.watchdog, lines.contains(&&b"WATCHDOG=1"[..]));
            // What it read, said again, reads the same.
            let again = datagram(&m, &[], 0, true);
            prop_assert_eq!(parse(&again), m);
        }

        /// What a sender says, among any other assignments and in any order, is what is
        /// read.
        #[test]
        fn what_a_sender_says_is_read(
            m in message(), others in others(), at in 0usize..8, end in any::<bool>(),
        ) {
            prop_assert_eq!(parse(&datagram(&m, &others, at, end)), m);
        }
    }
}

fn ready() -> Message {
    Message { ready: true, watchdog: false }
}
fn ping() -> Message {
    Message { ready: false, watchdog: true }
}

/// Issue 21, item 5: app A floods from 8 processes (WATCHDOG=1, READY=1 and STATUS= lines)
/// for a simulated second, one datagram every 10 µs; B's 64 workers each say READY=1 once,
/// in the middle. Every one of B's READY=1 is due at once, A's cgroup costs the supervisor
/// about one notification per window, and A's cgroup is looked up about once per sender,
/// window and flag.
#[test]
fn a_flood_from_one_cgroup_is_coalesced_and_another_cgroups_ready_goes_at_once() {
    let mut gate = Gate::default();
    let t0 = Instant::now();
    let a = "/ipcluster.slice/ipcluster-a.slice/ipcluster-a-1.scope/worker-100".to_owned();
    let mut lookups = 0;
    let mut to_supervisor: Vec<(Duration, Notification)> = Vec::new();
    for i in 0..100_000u32 {
        let now = t0 + Duration::from_micros(u64::from(i) * 10);
        let pid = 100 + i % 8;
        let message = match i % 3 {
            0 => ping(),
            1 => parse(b"STATUS=busy"),
            _ => Message { ready: true, watchdog: true },
        };
        gate.offer(pid, message, now, |_| {
            lookups += 1;
            Some(a.clone())
        });
        if i == 50_000 {
            for w in 0..64 {
                let b = format!("/ipcluster.slice/ipcluster-b.slice/ipcluster-b-1.scope/worker-{}", 1000 + w);
                assert_eq!(gate.offer(1000 + w, ready(), now, |_| Some(b)), Verdict::Taken);
            }
        }
        to_supervisor.extend(gate.due(now).into_iter().map(|n| (now - t0, n)));
    }
    let b: Vec<&(Duration, Notification)> =
        to_supervisor.iter().filter(|(_, n)| n.cgroup.contains("ipcluster-b-1")).collect();
    assert_eq!(b.len(), 64, "every READY=1 of B");
    assert!(b.iter().all(|(at, n)| *at == Duration::from_millis(500) && n.message.ready), "at once");
    let from_a = to_supervisor.len() - 64;
    assert!((10..=12).contains(&from_a), "A: {from_a} notifications for a second of flood");
    // At most once per sender, per window and per flag it adds: 8 × 2 × 10.
    assert!(lookups <= 8 * 2 * 11, "A's cgroup looked up {lookups} times");
    assert!(to_supervisor.iter().any(|(_, n)| n.cgroup == a && n.message.ready && n.message.watchdog));
}

/// Found by the chaos soak (issue 26): every worker that ever spoke stayed remembered, so
/// the daemon grew with every deploy. Once their window has ended, senders and cgroups are
/// forgotten, what waits is kept, and a forgotten one is treated exactly as if remembered.
#[test]
fn senders_and_cgroups_past_their_window_are_forgotten_and_nothing_changes_for_them() {
    let mut gate = Gate::default();
    let mut twin = Gate::default();
    let t0 = Instant::now();
    let cgroup = |w: u32| format!("/ipcluster.slice/ipcluster-a.slice/ipcluster-a-{w}.scope/worker-{w}");
    // Ten thousand workers come and go, each pinging once: then one more, still in its window.
    for w in 0..10_000u32 {
        for g in [&mut gate, &mut twin] {
            assert_eq!(g.offer(w, ping(), t0, |_| Some(cgroup(w))), Verdict::Taken);
        }
    }
    assert_eq!(gate.due(t0).len(), 10_000);
    twin.due(t0);
    let late = t0 + WINDOW;
    for g in [&mut gate, &mut twin] {
        g.offer(20_000, ping(), late, |_| Some(cgroup(20_000)));
        g.offer(20_000, ready(), late, |_| Some(cgroup(20_000)));
    }
    gate.forget_idle(late);
    assert_eq!(gate.remembered(), (1, 1), "only the sender and cgroup still in their window");
    // Both gates decide the same from here on: the waiting notification, a forgotten
    // worker's next ping, and the one in its window.
    for g in [&mut gate, &mut twin] {
        g.offer(7, ping(), late, |_| Some(cgroup(7)));
    }
    let (mut a, mut b) = (gate.due(late), twin.due(late));
    a.sort_by_key(|n| n.pid);
    b.sort_by_key(|n| n.pid);
    assert_eq!(a, b);
    assert_eq!(a.iter().map(|n| n.pid).collect::<Vec<_>>(), [7, 20_000]);
    assert!(a[1].message.ready && a[1].message.watchdog, "merged, not lost");
    let later = late + WINDOW;
    gate.forget_idle(later);
    assert_eq!(gate.remembered(), (0, 0));
}

#[test]
fn nothing_useful_or_foreign_is_dropped_and_a_full_queue_loses_nothing() {
    let mut gate = Gate::default();
    let now = Instant::now();
    let c = "/ipcluster.slice/x.slice/x-1.scope/worker-7".to_owned();
    assert_eq!(gate.offer(7, parse(b"STATUS=hi"), now, |_| panic!("no lookup")), Verdict::Redundant);
    assert_eq!(gate.offer(8, ready(), now, |_| Some("/user.slice/u.scope".into())), Verdict::Foreign);
    assert_eq!(gate.offer(9, ready(), now, |_| None), Verdict::Foreign);
    assert_eq!(gate.offer(7, ping(), now, |_| Some(c.clone())), Verdict::Taken);
    let due = gate.due(now);
    assert_eq!(due.len(), 1);
    // The queue was full: it waits, merged with what comes next, and goes at once.
    gate.requeue(due.into_iter().next().unwrap(), now);
    assert_eq!(gate.offer(10, ready(), now, |_| Some(c.clone())), Verdict::Taken);
    let again = gate.due(now);
    assert_eq!(again.len(), 1);
    assert!(again[0].message.ready && again[0].message.watchdog, "{again:?}");
    // The same again within the window waits for its end.
    assert_eq!(gate.offer(7, ping(), now + WINDOW / 2, |_| Some(c.clone())), Verdict::Redundant);
    assert_eq!(gate.offer(11, ping(), now + WINDOW / 2, |_| Some(c.clone())), Verdict::Taken);
    assert!(gate.due(now + WINDOW / 2).is_empty());
    assert_eq!(gate.next_due(), Some(now + WINDOW));
    assert_eq!(gate.due(now + WINDOW).len(), 1);
    assert_eq!(gate.next_due(), None);
}

#[test]
fn kernel_supplies_the_sender_pid() {
    let dir = crate::test_dir("notify");
    let path = dir.join("notify");
    let rx = Receiver::bind(&path).unwrap();
    let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
    tx.send_to(b"READY=1\n", &path).unwrap();
    let (pid, msg) = rx.recv().unwrap();
    assert_eq!(pid, std::process::id());
    assert!(msg.ready);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// systemd-notify(1) follows `READY=1` with `BARRIER=1` carrying a pipe and waits until the
/// receiver closes it; a sender may also pass more descriptors than are read. Either way the
/// datagram is read, and every descriptor is closed.
#[test]
fn passed_descriptors_are_closed_and_the_datagram_still_read() {
    use std::os::fd::AsFd;

    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let dir = crate::test_dir("notify-fds");
    let path = dir.join("notify");
    let rx = Receiver::bind(&path).unwrap();
    let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
    tx.connect(&path).unwrap();
    for count in [1, MAX_FDS + 5] {
        let pipes: Vec<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> =
            (0..count).map(|_| rustix::pipe::pipe().unwrap()).collect();
        let writers: Vec<std::os::fd::BorrowedFd<'_>> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        let mut space = vec![std::mem::MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(count))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&writers)));
        rustix::net::sendmsg(&tx, &[io::IoSlice::new(b"BARRIER=1")], &mut control, SendFlags::empty())
            .unwrap();
        drop(writers);
        let readers: Vec<std::os::fd::OwnedFd> = pipes.into_iter().map(|(r, _)| r).collect();
        // Our own write ends are closed now: only the receiver's copies keep the pipes open.
        let (pid, _) = rx.recv().unwrap();
        assert_eq!(pid, std::process::id());
        for r in &readers {
            let mut b = [0u8; 1];
            assert_eq!(rustix::io::read(r, &mut b).unwrap(), 0, "{count} fds: every copy is closed");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
