//! The transparency log at 1,000,000 leaves in memory: append cost per leaf, inclusion and
//! consistency proofs served per second, side by side with a naive log that keeps only the
//! leaves and recomputes from all of them (at a smaller size, where it still finishes).
//!
//! Run: `cargo bench -p compliance-agent --bench tlog`

use std::time::{Duration, Instant};

use compliance_agent::tlog::{
    Hash, Log, MemoryStore, leaf_hash, node_hash, verify_consistency, verify_inclusion,
};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const LEAVES: u64 = 1_000_000;
const PROOFS: usize = 200_000;
const NAIVE_LEAVES: usize = 10_000;
const NAIVE_RUNS: usize = 200;

/// A fixed LCG so every run asks for the same proofs.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) % n
    }
}

fn leaf(i: u64) -> Hash {
    leaf_hash(format!("bundle {i}").as_bytes())
}

/// The naive log: MTH recomputed from every leaf hash.
fn naive_root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        1 => leaves[0],
        n => {
            let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&naive_root(&leaves[..k]), &naive_root(&leaves[k..]))
        }
    }
}

/// The naive log's inclusion proof: PATH over every leaf hash.
fn naive_path(m: usize, leaves: &[Hash], out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n == 1 {
        return;
    }
    let k = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
    if m < k {
        naive_path(m, &leaves[..k], out);
        out.push(naive_root(&leaves[k..]));
    } else {
        naive_path(m - k, &leaves[k..], out);
        out.push(naive_root(&leaves[..k]));
    }
}

fn per_second(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn peak_rss_mb() -> BenchResult<f64> {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)?;
    Ok(usage.max_rss() as f64 / 1024.0)
}

fn main() -> BenchResult<()> {
    println!("transparency log, in memory (MemoryStore), {LEAVES} leaves");

    // Appends, one call per leaf as the server appends accepted bundles.
    let mut log = Log::new(MemoryStore::new());
    let start = Instant::now();
    let mut last_window = Duration::ZERO;
    for i in 0..LEAVES {
        let t = Instant::now();
        log.append(leaf(i))?;
        if i >= LEAVES - 10_000 {
            last_window += t.elapsed();
        }
    }
    let total = start.elapsed();
    let append_ns = total.as_nanos() as f64 / LEAVES as f64;
    let append_last_ns = last_window.as_nanos() as f64 / 10_000.0;
    // The leaf hash is part of each iteration above; report it on its own too.
    let t = Instant::now();
    let mut sink = [0u8; 32];
    for i in 0..100_000u64 {
        sink = node_hash(&sink, &leaf(i));
    }
    let hash_ns = t.elapsed().as_nanos() as f64 / 100_000.0;
    std::hint::black_box(sink);
    let root = log.root(LEAVES)?;

    // Inclusion proofs of random leaves at the full size, each verified once
    // outside the timed loop (a sample) so the figure is what a server serves.
    let mut rng = Lcg(1);
    let indices: Vec<u64> = (0..PROOFS).map(|_| rng.below(LEAVES)).collect();
    let t = Instant::now();
    let mut hashes = 0usize;
    for &m in &indices {
        hashes += log.inclusion_proof(m, LEAVES)?.hashes.len();
    }
    let inclusion = t.elapsed();
    for &m in indices.iter().take(1000) {
        let p = log.inclusion_proof(m, LEAVES)?;
        verify_inclusion(&leaf(m), m, LEAVES, &p.hashes, &root)?;
    }
    let t = Instant::now();
    for &m in indices.iter().take(50_000) {
        let p = log.inclusion_proof(m, LEAVES)?;
        verify_inclusion(&leaf(m), m, LEAVES, &p.hashes, &root)?;
    }
    let inclusion_verified = t.elapsed();

    // Consistency proofs from random older sizes to the full size.
    let olds: Vec<u64> = (0..PROOFS).map(|_| 1 + rng.below(LEAVES - 1)).collect();
    let t = Instant::now();
    for &m in &olds {
        std::hint::black_box(log.consistency_proof(m, LEAVES)?);
    }
    let consistency = t.elapsed();
    for &m in olds.iter().take(1000) {
        let p = log.consistency_proof(m, LEAVES)?;
        verify_consistency(m, LEAVES, &log.root(m)?, &root, &p.hashes)?;
    }
    let rss = peak_rss_mb()?;

    // The naive log at a smaller size: append = recompute the root from all
    // leaves; proof = PATH over all leaves.
    let naive_leaves: Vec<Hash> = (0..NAIVE_LEAVES as u64).map(leaf).collect();
    let t = Instant::now();
    for _ in 0..NAIVE_RUNS {
        std::hint::black_box(naive_root(&naive_leaves));
    }
    let naive_append_ns = t.elapsed().as_nanos() as f64 / NAIVE_RUNS as f64;
    let t = Instant::now();
    let mut out = Vec::new();
    for i in 0..NAIVE_RUNS {
        out.clear();
        naive_path(i * 37 % NAIVE_LEAVES, &naive_leaves, &mut out);
        std::hint::black_box(&out);
    }
    let naive_proof = t.elapsed();
    // Ours at the same small size, for the like-for-like row.
    let mut small = Log::new(MemoryStore::new());
    let t = Instant::now();
    for h in &naive_leaves {
        small.append(*h)?;
    }
    let small_append_ns = t.elapsed().as_nanos() as f64 / NAIVE_LEAVES as f64;
    let t = Instant::now();
    for i in 0..PROOFS {
        std::hint::black_box(
            small.inclusion_proof((i * 37 % NAIVE_LEAVES) as u64, NAIVE_LEAVES as u64)?,
        );
    }
    let small_proof = t.elapsed();

    println!();
    println!("| log | leaves | append, per leaf | inclusion proofs/s | consistency proofs/s |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| tlog::Log (MemoryStore) | {LEAVES} | {append_ns:.0} ns (last 10,000: {append_last_ns:.0} ns) | {:.0} | {:.0} |",
        per_second(PROOFS, inclusion),
        per_second(PROOFS, consistency)
    );
    println!(
        "| tlog::Log (MemoryStore) | {NAIVE_LEAVES} | {small_append_ns:.0} ns | {:.0} | |",
        per_second(PROOFS, small_proof)
    );
    println!(
        "| naive: recompute from all leaves | {NAIVE_LEAVES} | {:.0} ns (new root per append) | {:.0} | |",
        naive_append_ns,
        per_second(NAIVE_RUNS, naive_proof)
    );
    println!();
    println!(
        "inclusion proofs served and verified: {:.0}/s; mean proof length {:.1} hashes",
        per_second(50_000, inclusion_verified),
        hashes as f64 / PROOFS as f64
    );
    println!("one node hash plus one leaf hash: {hash_ns:.0} ns (the floor of an append)");
    println!(
        "naive append at {NAIVE_LEAVES} leaves costs {:.0}x ours at {LEAVES}; a naive proof {:.0}x",
        naive_append_ns / append_ns,
        per_second(PROOFS, inclusion) / per_second(NAIVE_RUNS, naive_proof)
    );
    println!(
        "peak RSS {rss:.1} MB ({} hashes stored, {:.1} MB of them)",
        2 * LEAVES,
        (2 * LEAVES * 32) as f64 / 1_048_576.0
    );
    Ok(())
}
