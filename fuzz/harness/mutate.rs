//! A deterministic mutator for the stand-in tests that run the fuzz harnesses
//! in `cargo test`: a seeded PRNG (xorshift64*) and libFuzzer-like byte
//! mutations (flip a bit, set a byte, set an interesting integer, insert,
//! delete, duplicate a chunk, truncate), one to four per input.

/// xorshift64* — small, fast, and the same sequence on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
    4096,
    1 << 20,
    64 << 20,
];

/// One mutant of `input` (never longer than `max_len`).
pub fn mutate(rng: &mut Rng, input: &[u8], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 if !v.is_empty() => {
                // An interesting little-endian integer of 1, 2, 4 or 8 bytes.
                let width = [1usize, 2, 4, 8][rng.below(4)];
                let i = rng.below(v.len());
                let val = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let end = (i + width).min(v.len());
                v[i..end].copy_from_slice(&val[..end - i]);
            }
            3 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            4 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                v.drain(i..i + n);
            }
            5 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            6 if !v.is_empty() => {
                let keep = rng.below(v.len());
                v.truncate(keep);
            }
            _ if !v.is_empty() => {
                // Flip a bit in the first 64 bytes (headers), where most checks are.
                let i = rng.below(v.len().min(64));
                v[i] ^= 1 << rng.below(8);
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v.truncate(max_len);
    v
}

/// Iterations of a stand-in test: `FUZZ_STANDIN_ITERS`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("FUZZ_STANDIN_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `f` on `iters` mutants of the seeds (seed `k` of the PRNG is `base + k`);
/// a panic is re-raised with the input in hex, so that it can become a
/// regression test.
pub fn run_mutants<T>(
    name: &str,
    seeds: &[Vec<u8>],
    iters: usize,
    base: u64,
    max_len: usize,
    f: impl Fn(&[u8]) -> T,
) -> (usize, usize)
where
    T: IsOk,
{
    let mut ok = 0;
    let mut rng = Rng::new(base);
    for k in 0..iters {
        let seed = &seeds[k % seeds.len()];
        let input = mutate(&mut rng, seed, max_len);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&input)));
        match r {
            Ok(v) => ok += usize::from(v.is_ok()),
            Err(p) => {
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                panic!(
                    "{name}: mutant {k} (PRNG base {base}) panicked: {:?}\ninput ({} bytes): {hex}",
                    p.downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| p.downcast_ref::<&str>().copied()),
                    input.len()
                );
            }
        }
    }
    (ok, iters - ok)
}

/// Whether a harness result is a success.
pub trait IsOk {
    fn is_ok(&self) -> bool;
}

impl<T, E> IsOk for Result<T, E> {
    fn is_ok(&self) -> bool {
        Result::is_ok(self)
    }
}
