//! The terminal of the live view: raw mode (keys arrive one by one, unechoed) and the alternate
//! screen while it runs, and the terminal as it was on every way out — a return, an error, a
//! signal, a panic.
//!
//! What to undo is kept in one place, [`SAVED`], that the [`Screen`] guard's `Drop` and a panic
//! hook both reach, whichever comes first: the hook runs before unwinding, so the panic message is
//! printed on the restored terminal instead of being lost on the alternate screen. The hook and
//! the restore write through a descriptor of their own, never through `std::io::stdout()`, whose
//! lock a panic may hold.
//!
//! Raw mode is set here with termios (not crossterm's global `enable_raw_mode`, which works on
//! stdin or /dev/tty only) so that it applies to a given terminal, and a test can check every
//! step on a pseudo-terminal of its own.

use std::{
    fs::File,
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
    sync::{Mutex, MutexGuard, Once},
};

use crossterm::{cursor, queue, style, terminal};
use rustix::termios::{self, OptionalActions, Termios};

use super::view::{Line, Style};

/// What to undo: the terminal's mode as it was, and where to write the sequences that leave the
/// alternate screen.
struct Saved {
    tty: OwnedFd,
    termios: Termios,
    out: File,
}

static SAVED: Mutex<Option<Saved>> = Mutex::new(None);

fn saved() -> MutexGuard<'static, Option<Saved>> {
    // Poisoned only by a panic while held, which nothing here can cause; the data is still right.
    SAVED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The terminal in the live view's mode, for as long as this lives.
#[derive(Debug)]
pub struct Screen {
    out: File,
}

impl Screen {
    /// Raw mode on `tty` (where keys are read), the alternate screen and no cursor on `out`
    /// (where frames go). Usually both are the same terminal.
    pub fn enter(tty: OwnedFd, out: OwnedFd) -> io::Result<Self> {
        let before = termios::tcgetattr(&tty)?;
        let mut raw = before.clone();
        raw.make_raw();
        install_panic_hook();
        let screen = Self { out: File::from(out.try_clone()?) };
        // Saved before anything changes, so a failure halfway is undone like the rest.
        let set = termios::tcsetattr(&tty, OptionalActions::Now, &raw);
        *saved() = Some(Saved { tty, termios: before, out: File::from(out) });
        set?;
        let mut buf = Vec::new();
        queue!(buf, terminal::EnterAlternateScreen, cursor::Hide, terminal::Clear(terminal::ClearType::All))?;
        (&screen.out).write_all(&buf)?;
        Ok(screen)
    }

    /// Draws `frame` over the previous one, in one write.
    pub fn draw(&self, frame: &[Line]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(8192);
        queue!(buf, terminal::BeginSynchronizedUpdate)?;
        for (row, line) in frame.iter().enumerate() {
            queue!(buf, cursor::MoveTo(0, row as u16))?;
            for span in &line.0 {
                match color(span.style) {
                    Some(c) => queue!(
                        buf,
                        c,
                        style::Print(&span.text),
                        style::SetAttribute(style::Attribute::Reset)
                    )?,
                    None => queue!(buf, style::Print(&span.text))?,
                }
            }
            queue!(buf, terminal::Clear(terminal::ClearType::UntilNewLine))?;
        }
        if frame.len() < usize::from(u16::MAX) {
            queue!(
                buf,
                cursor::MoveTo(0, frame.len() as u16),
                terminal::Clear(terminal::ClearType::FromCursorDown)
            )?;
        }
        queue!(buf, terminal::EndSynchronizedUpdate)?;
        (&self.out).write_all(&buf)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = restore();
    }
}

/// Leaves the alternate screen, shows the cursor and puts the terminal's mode back, once; later
/// calls do nothing.
pub fn restore() -> io::Result<()> {
    let Some(s) = saved().take() else { return Ok(()) };
    let mut buf = Vec::new();
    queue!(buf, style::ResetColor, cursor::Show, terminal::LeaveAlternateScreen)?;
    let wrote = (&s.out).write_all(&buf);
    termios::tcsetattr(s.tty.as_fd(), OptionalActions::Now, &s.termios)?;
    wrote
}

/// Restores the terminal before the panic is reported (by the hook that was there before).
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let _ = restore();
            previous(info);
        }));
    });
}

/// The escape sequence a style starts with (`None`: plain). crossterm leaves colors out when
/// `NO_COLOR` is set.
fn color(s: Style) -> Option<style::SetStyle> {
    use style::{Attribute, Attributes, Color, ContentStyle};
    let (fg, attrs): (Option<Color>, &[Attribute]) = match s {
        Style::Plain => return None,
        Style::Title => (None, &[Attribute::Bold]),
        Style::Header => (None, &[Attribute::Reverse]),
        Style::Dim | Style::Finished => (None, &[Attribute::Dim]),
        Style::Error => (Some(Color::Red), &[Attribute::Bold]),
        Style::Live => (Some(Color::Green), &[]),
        Style::Starting => (Some(Color::Cyan), &[]),
        Style::Retired => (Some(Color::Yellow), &[]),
        Style::Failed => (Some(Color::Red), &[]),
    };
    let mut attributes = Attributes::default();
    for a in attrs {
        attributes.set(*a);
    }
    Some(style::SetStyle(ContentStyle {
        foreground_color: fg,
        background_color: None,
        underline_color: None,
        attributes,
    }))
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        sync::atomic::{AtomicU8, Ordering},
    };

    use rustix::{
        fs::{Mode, OFlags},
        pty::OpenptFlags,
    };

    use super::*;

    /// A pseudo-terminal: (master, slave).
    fn pty() -> (File, OwnedFd) {
        let master = rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let name = rustix::pty::ptsname(&master, Vec::new()).unwrap();
        let slave = rustix::fs::open(name.as_c_str(), OFlags::RDWR | OFlags::NOCTTY, Mode::empty()).unwrap();
        rustix::fs::fcntl_setfl(&master, OFlags::NONBLOCK).unwrap();
        (File::from(master), slave)
    }

    /// Everything the terminal received so far.
    fn received(master: &mut File) -> String {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = master.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn modes(t: &Termios) -> String {
        format!("{:?} {:?} {:?} {:?}", t.input_modes, t.output_modes, t.control_modes, t.local_modes)
    }

    /// 0: the hook did not run; 1: it ran on a restored terminal; 2: on a raw one.
    static HOOK_SAW: AtomicU8 = AtomicU8::new(0);

    #[test]
    fn the_terminal_is_restored_on_return_and_before_a_panic_is_reported() {
        let (mut master, slave) = pty();
        let before = modes(&termios::tcgetattr(&slave).unwrap());
        // The hook that would print the panic: it records what the terminal looked like then.
        let probe = slave.try_clone().unwrap();
        let cooked = before.clone();
        std::panic::set_hook(Box::new(move |_| {
            let now = modes(&termios::tcgetattr(&probe).unwrap());
            HOOK_SAW.store(if now == cooked { 1 } else { 2 }, Ordering::SeqCst);
        }));

        // A return: raw while it lives, as before once dropped.
        let screen = Screen::enter(slave.try_clone().unwrap(), slave.try_clone().unwrap()).unwrap();
        let raw = termios::tcgetattr(&slave).unwrap();
        assert!(!raw.local_modes.contains(termios::LocalModes::ICANON | termios::LocalModes::ECHO));
        assert_ne!(modes(&raw), before);
        let frame = [Line(vec![super::super::view::Span { text: "live".into(), style: Style::Live }])];
        screen.draw(&frame).unwrap();
        drop(screen);
        assert_eq!(modes(&termios::tcgetattr(&slave).unwrap()), before);
        let seen = received(&mut master);
        let (enter, live, leave) = (seen.find("\x1b[?1049h"), seen.find("live"), seen.rfind("\x1b[?1049l"));
        assert!(enter < live && live < leave && enter.is_some(), "{seen:?}");
        assert!(seen.contains("\x1b[?25l") && seen.ends_with("\x1b[?25h\x1b[?1049l"), "{seen:?}");
        restore().unwrap();
        assert_eq!(received(&mut master), "", "restored once only");

        // A panic: the terminal is restored before the panic's hook runs, and once.
        let result = std::panic::catch_unwind(|| {
            let _screen = Screen::enter(slave.try_clone().unwrap(), slave.try_clone().unwrap()).unwrap();
            panic!("in the live view");
        });
        assert!(result.is_err());
        let _ = std::panic::take_hook();
        assert_eq!(HOOK_SAW.load(Ordering::SeqCst), 1, "the panic was reported on a raw terminal");
        assert_eq!(modes(&termios::tcgetattr(&slave).unwrap()), before);
        let seen = received(&mut master);
        assert_eq!(seen.matches("\x1b[?1049l").count(), 1, "{seen:?}");
    }

    #[test]
    fn every_style_but_plain_looks_different_and_states_have_colors_of_their_own() {
        let all = [
            Style::Title,
            Style::Header,
            Style::Dim,
            Style::Error,
            Style::Live,
            Style::Starting,
            Style::Retired,
            Style::Failed,
        ];
        assert!(color(Style::Plain).is_none());
        let styles: Vec<style::ContentStyle> = all.iter().map(|s| color(*s).unwrap().0).collect();
        for (i, a) in styles.iter().enumerate() {
            assert_ne!(*a, style::ContentStyle::default(), "{:?}", all[i]);
            for (j, b) in styles.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{:?} and {:?} look the same", all[i], all[j]);
            }
        }
    }
}
