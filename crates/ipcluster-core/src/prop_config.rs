//! The one configuration of every property test in the workspace.
//!
//! `cargo xtask test` gates landings, so it must give the same result on every run: each
//! property test draws its cases from a fixed seed ([`SEED`]) at its own case count, and
//! writes no persistence file (proptest would write it beside the sources, where nothing reads
//! it back). A failing input found once is kept as a named `#[test]` beside its property.
//!
//! Random exploration is a separate command, `cargo xtask props [--cases N] [--seed S]`: it sets
//! [`SEED_VAR`] (a random seed it prints when none is given) and [`CASES_VAR`], and runs only
//! the property tests, every one at `N` cases, so that a failure it finds can be replayed with
//! the same two numbers. (The names are always here, for xtask; [`config`] only with the
//! `proptest` feature or in this crate's tests, as are [`mutated`] and [`mutated_bytes`]: the
//! near-valid inputs every parser's property draws beside arbitrary ones.)

/// The seed of every property test in `cargo xtask test`.
pub const SEED: u64 = 0x1bc1_a57e_d5ee_d020;
/// Overrides [`SEED`] (decimal), for exploration and replay.
pub const SEED_VAR: &str = "IPCLUSTER_PROPTEST_SEED";
/// Overrides every property test's case count, for exploration.
pub const CASES_VAR: &str = "IPCLUSTER_PROPTEST_CASES";

/// `cases` cases from the fixed seed, no persistence file, no forking; [`SEED_VAR`] and
/// [`CASES_VAR`] override the seed and the count. An override that does not parse is a
/// panic, not a silent fallback to the gating values.
#[cfg(any(test, feature = "proptest"))]
pub fn config(cases: u32) -> proptest::test_runner::Config {
    use proptest::test_runner::{Config, RngAlgorithm, RngSeed};

    let var = |name: &str| {
        std::env::var(name).ok().map(|v| {
            v.trim().parse::<u64>().unwrap_or_else(|_| panic!("{name}={v:?}: expected a decimal number"))
        })
    };
    let seed = var(SEED_VAR).unwrap_or(SEED);
    let cases = var(CASES_VAR).map_or(cases, |n| u32::try_from(n).unwrap_or(u32::MAX));
    Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        rng_algorithm: RngAlgorithm::ChaCha,
        ..Config::default()
    }
}

/// Near-valid text: `valid` with one to four small edits (a few characters deleted, inserted,
/// replaced or repeated, the text cut short, two lines swapped), the characters drawn mostly
/// from those that mean something in the formats read here (quotes, brackets, `=`, `-`, `:`,
/// digits, newlines, controls). A parser's mistakes hide near what it accepts, where random
/// text seldom goes.
#[cfg(any(test, feature = "proptest"))]
pub fn mutated(
    valid: impl proptest::strategy::Strategy<Value = String>,
) -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    const MEANINGFUL: &str =
        "\n\r\t \"'\\=[]{}(),:;#-+./!*@%_0123456789aAzZ\0\u{7}\u{1b}\u{7f}é\u{85}\u{2028}";
    let char = prop_oneof![
        3 => proptest::sample::select(MEANINGFUL.chars().collect::<Vec<_>>()),
        1 => any::<char>(),
    ];
    (valid, proptest::collection::vec(edit(char), 1..5)).prop_map(|(text, edits)| {
        let mut v: Vec<char> = text.chars().collect();
        for e in &edits {
            e.apply(&mut v, '\n');
        }
        v.into_iter().collect()
    })
}

/// Near-valid bytes: [`mutated`] for binary input, any byte inserted or replaced.
#[cfg(any(test, feature = "proptest"))]
pub fn mutated_bytes(
    valid: impl proptest::strategy::Strategy<Value = Vec<u8>>,
) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let byte = prop_oneof![
        3 => proptest::sample::select(b"\n\r\t \"\\=[]{}:,-0123456789\0\xff".to_vec()),
        1 => any::<u8>(),
    ];
    (valid, proptest::collection::vec(edit(byte), 1..5)).prop_map(|(mut v, edits)| {
        for e in &edits {
            e.apply(&mut v, b'\n');
        }
        v
    })
}

/// One small edit of a sequence; positions are drawn relative to its length at the time.
#[cfg(any(test, feature = "proptest"))]
#[derive(Debug, Clone)]
enum Edit<T> {
    Delete(proptest::sample::Index, u8),
    Insert(proptest::sample::Index, T),
    Replace(proptest::sample::Index, T),
    Repeat(proptest::sample::Index, proptest::sample::Index, u8),
    Cut(proptest::sample::Index),
    SwapLines(proptest::sample::Index, proptest::sample::Index),
}

#[cfg(any(test, feature = "proptest"))]
fn edit<T: Clone + std::fmt::Debug>(
    item: impl proptest::strategy::Strategy<Value = T> + Clone,
) -> impl proptest::strategy::Strategy<Value = Edit<T>> {
    use proptest::{prelude::*, sample::Index};
    prop_oneof![
        (any::<Index>(), 1u8..8).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<Index>(), item.clone()).prop_map(|(i, c)| Edit::Insert(i, c)),
        (any::<Index>(), item).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<Index>(), any::<Index>(), 1u8..16).prop_map(|(i, j, n)| Edit::Repeat(i, j, n)),
        any::<Index>().prop_map(Edit::Cut),
        (any::<Index>(), any::<Index>()).prop_map(|(i, j)| Edit::SwapLines(i, j)),
    ]
}

#[cfg(any(test, feature = "proptest"))]
impl<T: Clone + PartialEq> Edit<T> {
    fn apply(&self, v: &mut Vec<T>, newline: T) {
        let len = v.len();
        match self {
            Edit::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                v.drain(at..(at + usize::from(*n)).min(len));
            }
            Edit::Insert(i, c) => v.insert(i.index(len + 1), c.clone()),
            Edit::Replace(i, c) if len > 0 => v[i.index(len)] = c.clone(),
            Edit::Repeat(i, j, n) if len > 0 => {
                let at = i.index(len);
                let part: Vec<T> = v[at..(at + usize::from(*n)).min(len)].to_vec();
                let to = j.index(len + 1);
                v.splice(to..to, part);
            }
            Edit::Cut(i) => v.truncate(i.index(len + 1)),
            Edit::SwapLines(i, j) => {
                let mut lines: Vec<Vec<T>> = v.split(|x| *x == newline).map(<[T]>::to_vec).collect();
                let (a, b) = (i.index(lines.len()), j.index(lines.len()));
                lines.swap(a, b);
                *v = lines.join(&newline);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::{prelude::*, strategy::ValueTree, test_runner::TestRunner};

    use super::*;

    /// Two runners of the same configuration draw the same values: the suite's cases are the
    /// same on every run.
    #[test]
    fn the_same_seed_draws_the_same_cases() {
        let draw = || {
            let mut runner = TestRunner::new(config(16));
            (0..16)
                .map(|_| any::<(u64, String)>().new_tree(&mut runner).unwrap().current())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
    }
}
