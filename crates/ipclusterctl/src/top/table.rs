//! The table toolkit of `ipclusterctl top`: styled spans and lines (what the screen draws), a
//! table whose columns are dropped from the right when the terminal is too narrow, and the
//! short forms numbers and text take in it.

use std::time::Duration;

/// How many of `total` rows fit in `lines` lines: all, or one less, for the line that says how
/// many more there are.
pub(super) fn shown(lines: usize, total: usize) -> usize {
    if lines >= total { total } else { lines.saturating_sub(1) }
}

pub(super) fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A duration as people write a refresh interval: `1s`, `0.5s`.
pub(super) fn seconds(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    format!("{}s", s.trim_end_matches('0').trim_end_matches('.'))
}

/// A size in bytes, shortly, in powers of 1024 as `ps` and `top` count (`980K`, `12.3M`).
pub(super) fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if v < 10.0 && unit > 0 { format!("{v:.1}{}", UNITS[unit]) } else { format!("{v:.0}{}", UNITS[unit]) }
}

/// `s` cut to `n` characters, the last of them `…` when something was cut.
pub(super) fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    if n > 0 {
        out.push('…');
    }
    out
}

/// Text from the daemon (an exit reason) as it may reach a terminal: no control characters.
pub(super) fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// How a span looks on a terminal (a snapshot for a pipe has no styles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Plain,
    Title,
    /// A table's header.
    Header,
    Dim,
    Error,
    /// A state, colored as `status` colors it.
    Live,
    Starting,
    Retired,
    Failed,
    Finished,
}

impl Style {
    pub(super) fn of_state(state: &str) -> Self {
        match state {
            "live" | "canary" => Style::Live,
            "starting" => Style::Starting,
            "retired" | "stopping" | "draining" => Style::Retired,
            "failed" => Style::Failed,
            _ => Style::Finished,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub text: String,
    pub style: Style,
}

impl Span {
    pub(super) fn new(text: impl Into<String>, style: Style) -> Self {
        Self { text: text.into(), style }
    }
}

/// One line of the frame.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Line(pub Vec<Span>);

impl Line {
    pub(super) fn one(text: impl Into<String>, style: Style) -> Self {
        Self(vec![Span::new(text, style)])
    }

    /// The text alone.
    pub fn text(&self) -> String {
        self.0.iter().map(|s| s.text.as_str()).collect()
    }

    /// At most `width` characters: the terminal would wrap a longer line and push the frame down.
    pub(super) fn cut(self, width: usize) -> Self {
        let mut left = width;
        let mut out = Vec::new();
        for span in self.0 {
            if left == 0 {
                break;
            }
            let n = span.text.chars().count();
            if n <= left {
                left -= n;
                out.push(span);
            } else {
                out.push(Span::new(cut(&span.text, left), span.style));
                left = 0;
            }
        }
        Self(out)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Col {
    pub(super) head: &'static str,
    pub(super) right: bool,
    /// Columns of lower priority are left out first when the terminal is narrow.
    pub(super) priority: u8,
}

impl Col {
    pub(super) fn left(head: &'static str, priority: u8) -> Self {
        Self { head, right: false, priority }
    }
    pub(super) fn right(head: &'static str, priority: u8) -> Self {
        Self { head, right: true, priority }
    }
}

#[derive(Debug, Clone)]
pub(super) struct Cell {
    pub(super) text: String,
    pub(super) style: Style,
}

impl Cell {
    pub(super) fn plain(text: String) -> Self {
        Self { text, style: Style::Plain }
    }
    pub(super) fn state(state: &str) -> Self {
        Self { text: printable(state), style: Style::of_state(state) }
    }
}

/// A table with the columns that fit.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) cols: Vec<(Col, usize)>,
    pub(super) rows: Vec<Vec<Cell>>,
    /// How many rows there are, shown or not.
    pub(super) total: usize,
    pub(super) what: &'static str,
}

impl Table {
    /// Each column as wide as its widest cell; without `width`, every column; with it, the
    /// columns of lowest priority are left out until the rest fits.
    pub(super) fn new(
        cols: Vec<Col>,
        rows: Vec<Vec<Cell>>,
        total: usize,
        width: Option<usize>,
        what: &'static str,
    ) -> Self {
        let widths: Vec<usize> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| rows.iter().map(|r| r[i].text.chars().count()).max().unwrap_or(0).max(c.head.len()))
            .collect();
        let mut keep = vec![true; cols.len()];
        if let Some(width) = width {
            let total = |keep: &[bool]| {
                let shown: Vec<usize> = (0..cols.len()).filter(|i| keep[*i]).map(|i| widths[i]).collect();
                shown.iter().sum::<usize>() + shown.len().saturating_sub(1)
            };
            let mut order: Vec<usize> = (0..cols.len()).collect();
            order.sort_by_key(|i| cols[*i].priority);
            for i in order {
                if total(&keep) <= width || keep.iter().filter(|k| **k).count() == 1 {
                    break;
                }
                keep[i] = false;
            }
        }
        let shown: Vec<usize> = (0..cols.len()).filter(|i| keep[*i]).collect();
        Self {
            cols: shown.iter().map(|i| (cols[*i].clone(), widths[*i])).collect(),
            rows: rows.into_iter().map(|r| shown.iter().map(|i| r[*i].clone()).collect()).collect(),
            total,
            what,
        }
    }

    /// The header and the rows; when some were left out, a last line says how many.
    pub(super) fn lines(&self) -> Vec<Line> {
        let head: Vec<Cell> =
            self.cols.iter().map(|(c, _)| Cell { text: c.head.into(), style: Style::Header }).collect();
        let mut out = vec![self.line(&head, Style::Header)];
        out.extend(self.rows.iter().map(|r| self.line(r, Style::Plain)));
        let more = self.total - self.rows.len();
        if more > 0 {
            out.push(Line::one(format!("… {more} more {}", self.what), Style::Dim));
        }
        out
    }

    /// A row; `between` is the style of the blanks between cells (a header is one bar).
    pub(super) fn line(&self, cells: &[Cell], between: Style) -> Line {
        let mut spans = Vec::new();
        let last = self.cols.len().saturating_sub(1);
        for (i, ((col, width), cell)) in self.cols.iter().zip(cells).enumerate() {
            if i > 0 {
                spans.push(Span::new(" ", between));
            }
            let pad = width.saturating_sub(cell.text.chars().count());
            let text = if col.right {
                format!("{}{}", " ".repeat(pad), cell.text)
            } else if i == last {
                // No trailing blanks after the last column.
                cell.text.clone()
            } else {
                format!("{}{}", cell.text, " ".repeat(pad))
            };
            spans.push(Span::new(text, cell.style));
        }
        Line(spans)
    }
}
