//! Bounded fuzzing with proptest, shared by the workspace's fuzz targets (Kafka request decoding
//! and record-batch validation in `sluice`, the node-to-node codec in `sluice-raft`). A target is
//! a check over bytes that must return (Ok or a refusal), never panic; inputs are arbitrary bytes
//! or seeds from `fuzz/corpus/<target>/` (real client captures, see `fuzz/README.md`) mutated the
//! way a broken or hostile peer would: bit flips, truncation, lying length and count fields,
//! inserted and deleted runs.
//!
//! Cases per target: the target's default (sized to stay under ~20 s in a debug build, so it runs
//! in `make test`), or `SLUICE_FUZZ_CASES` (`make fuzz` sets it much higher). Every run prints
//! its executions per second and corpus size (visible with `--nocapture`).

use std::path::Path;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Larger seed files are skipped: the corpus holds small captures.
const SEED_BYTES_MAX: usize = 1 << 20;
/// Seed files read per target at most (every loop is bounded).
const SEED_FILES_MAX: usize = 10_000;

/// The seeds of one target.
pub struct Corpus {
    pub seeds: Vec<Vec<u8>>,
    /// Files read from the corpus directory (the rest of `seeds` was built by the target).
    pub files: usize,
    pub file_bytes: usize,
}

impl Corpus {
    /// Every regular file of `dir` (sorted by name, so runs are reproducible); a missing
    /// directory is an empty corpus.
    pub fn load(dir: &Path) -> Corpus {
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .take(SEED_FILES_MAX)
                    .collect()
            })
            .unwrap_or_default();
        paths.sort();
        let seeds: Vec<Vec<u8>> = paths
            .iter()
            .filter_map(|p| std::fs::read(p).ok())
            .filter(|b| b.len() <= SEED_BYTES_MAX)
            .collect();
        let file_bytes = seeds.iter().map(Vec::len).sum();
        Corpus {
            files: seeds.len(),
            file_bytes,
            seeds,
        }
    }
}

/// `SLUICE_FUZZ_CASES` if set (and a number), else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Interesting values for length and count fields: the edges parsers get wrong.
const INTERESTING: [i32; 12] = [
    0,
    1,
    -1,
    2,
    0x7f,
    0x80,
    0xff,
    0x7fff,
    0xffff,
    i32::MAX,
    i32::MIN,
    0x0100_0000,
];

/// Applies mutations to `seed`; each `u64` of `ops` picks one operation, its position and value.
/// The result stays within `2 * seed.len() + 256` bytes.
pub fn mutate(seed: &[u8], ops: &[u64]) -> Vec<u8> {
    let mut out = seed.to_vec();
    let cap = 2 * seed.len() + 256;
    for &op in ops {
        let kind = op & 0x7;
        let pos = |len: usize| ((op >> 8) % (len as u64 + 1)) as usize;
        let val = (op >> 40) as u32;
        match kind {
            // Flip one bit.
            0 if !out.is_empty() => {
                let at = pos(out.len() - 1);
                out[at] ^= 1 << (val % 8);
            }
            // Overwrite one byte.
            1 if !out.is_empty() => {
                let at = pos(out.len() - 1);
                out[at] = val as u8;
            }
            // Truncate.
            2 => {
                let at = pos(out.len());
                out.truncate(at);
            }
            // A lying 32-bit length or count.
            3 if out.len() >= 4 => {
                let at = pos(out.len() - 4);
                let v = INTERESTING[val as usize % INTERESTING.len()];
                out[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            // A lying 16-bit length or count.
            4 if out.len() >= 2 => {
                let at = pos(out.len() - 2);
                let v = INTERESTING[val as usize % INTERESTING.len()] as i16;
                out[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            // A run of 0xff (huge varints, negative lengths) or of zeros.
            5 if !out.is_empty() => {
                let at = pos(out.len() - 1);
                let n = (val as usize % 6 + 1).min(out.len() - at);
                let b = if val & 0x100 == 0 { 0xff } else { 0x00 };
                out[at..at + n].fill(b);
            }
            // Insert a few bytes.
            6 if out.len() < cap => {
                let at = pos(out.len());
                let n = val as usize % 16 + 1;
                let bytes: Vec<u8> = (0..n).map(|i| (val >> (i % 4 * 8)) as u8).collect();
                out.splice(at..at, bytes);
            }
            // Delete a run.
            7 if !out.is_empty() => {
                let at = pos(out.len() - 1);
                let n = (val as usize % 32 + 1).min(out.len() - at);
                out.drain(at..at + n);
            }
            _ => {}
        }
    }
    out.truncate(cap);
    out
}

/// Arbitrary bytes half the time, a mutated seed otherwise (arbitrary only without seeds).
pub fn inputs(seeds: Vec<Vec<u8>>) -> BoxedStrategy<Vec<u8>> {
    let arbitrary = prop::collection::vec(any::<u8>(), 0..512);
    if seeds.is_empty() {
        return arbitrary.boxed();
    }
    let n = seeds.len();
    let mutated = (0..n, prop::collection::vec(any::<u64>(), 0..8))
        .prop_map(move |(i, ops)| mutate(&seeds[i], &ops));
    prop_oneof![1 => arbitrary, 3 => mutated].boxed()
}

/// What one run did: printed by [`run`], returned for the caller's own assertions.
#[derive(Debug, Clone, Copy)]
pub struct RunStats {
    pub cases: u32,
    pub seconds: f64,
    pub per_second: f64,
}

/// Runs `check` over every seed as is, then over `cases(default_cases)` generated inputs;
/// panics with the (shrunk) failing input on the first `Err` or panic.
pub fn run(
    target: &str,
    corpus: &Corpus,
    default_cases: u32,
    check: impl Fn(&[u8]) -> Result<(), String>,
) -> RunStats {
    for (i, seed) in corpus.seeds.iter().enumerate() {
        if let Err(e) = check(seed) {
            panic!("fuzz target {target}: seed {i} fails: {e}");
        }
    }
    let n = cases(default_cases);
    let mut runner = TestRunner::new(Config {
        cases: n,
        // Failures are reported with their input; nothing is written next to the sources.
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&inputs(corpus.seeds.clone()), |input| {
        check(&input).map_err(TestCaseError::fail)
    });
    let seconds = started.elapsed().as_secs_f64();
    let stats = RunStats {
        cases: n,
        seconds,
        per_second: f64::from(n) / seconds.max(1e-9),
    };
    println!(
        "fuzz {target}: {} cases in {:.1} s = {:.0} exec/s; corpus {} files, {} bytes ({} seeds in all)",
        stats.cases,
        stats.seconds,
        stats.per_second,
        corpus.files,
        corpus.file_bytes,
        corpus.seeds.len()
    );
    if let Err(e) = result {
        panic!("fuzz target {target} failed: {e}");
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_bounded_and_change_something() {
        let seed: Vec<u8> = (0..100u8).collect();
        let mut changed = 0;
        for op in 0..2000u64 {
            let ops = [op.wrapping_mul(0x9e37_79b9_7f4a_7c15), op];
            let out = mutate(&seed, &ops);
            assert!(out.len() <= 2 * seed.len() + 256);
            changed += usize::from(out != seed);
        }
        assert!(changed > 1500, "{changed}");
        assert!(mutate(&[], &[0, 1, 2, 3, 4, 5, 6, 7]).len() <= 256);
    }
}
