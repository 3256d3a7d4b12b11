//! Turning one row of logits into the next token: penalties, temperature, top-k, top-p,
//! min-p, and a seeded draw. Temperature 0 is greedy.

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1: off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (0: off).
    pub min_p: f32,
    /// CTRL-style penalty on tokens seen in the last `repeat_last_n` tokens (1: off).
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    /// OpenAI-style: subtract once for any generated occurrence ...
    pub presence_penalty: f32,
    /// ... and per generated occurrence.
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 42,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!(
                "repeat penalty must be > 0, got {}",
                self.repeat_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    /// Reused between tokens so sampling allocates nothing per token.
    candidates: Vec<(u32, f32)>,
    counts: std::collections::HashMap<u32, u32>,
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Self {
            params,
            rng,
            candidates: Vec::new(),
            counts: Default::default(),
            seen: Default::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `context` is every token so far (prompt and generated);
    /// `generated` is how many of them at the end were generated.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32], generated: usize) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 {
            let start = context.len().saturating_sub(p.repeat_last_n);
            self.seen.clear();
            for &t in &context[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    if self.seen.insert(t) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.counts.clear();
            for &t in &context[context.len().saturating_sub(generated)..] {
                *self.counts.entry(t).or_default() += 1;
            }
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }

        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / p.temperature)),
        );
        // Most likely first, ties by token id: a total order, so that selecting the top k and
        // sorting only those gives exactly the first k of a full sort.
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, order);
            c.truncate(p.top_k);
            c.sort_unstable_by(order);
        } else if p.top_p < 1.0 || p.min_p > 0.0 {
            c.sort_unstable_by(order);
        }
        // Without top-k, top-p or min-p there is no cut to make: the draw runs over the whole
        // vocabulary in token order (the same distribution, without sorting 50k candidates).
        // Softmax over the survivors.
        let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.1));
        let mut sum = 0.0f32;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1;
        }
        for x in c.iter_mut() {
            x.1 /= sum;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
        }
        let total: f32 = c.iter().map(|x| x.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for x in c.iter() {
            r -= x.1;
            if r <= 0.0 {
                return x.0;
            }
        }
        c[c.len() - 1].0
    }
}

/// The first index of the largest logit (NaNs are passed over; 0 when the first is NaN).
pub fn argmax(logits: &[f32]) -> u32 {
    let Some(&first) = logits.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    // The maximum in 8 lanes (exact in any order), then its first position.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = logits.chunks_exact(8);
    for c in &mut chunks {
        for (m, &l) in lanes.iter_mut().zip(c) {
            *m = m.max(l);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        let mut l = vec![0.1, 3.0, -1.0, 2.9];
        assert_eq!(s.sample(&mut l, &[], 0), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params.clone()
            });
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: 1,
            ..SamplingParams::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&mut [0.0, 1.0, 0.5], &[], 0), 1);
        }
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            ..SamplingParams::default()
        });
        // Token 0 holds ~88% of the mass: top-p 0.5 keeps it alone.
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[], 0), 0);
        }
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..SamplingParams::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [4.0, 2.0, 1.0, 0.0], &[], 0), 0);
        }
    }

    #[test]
    fn penalties_change_the_choice() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..SamplingParams::default()
        });
        // Token 1 was seen: 3.0 / 2 = 1.5 < 2.0.
        assert_eq!(s.sample(&mut [2.0, 3.0], &[1], 0), 0);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..SamplingParams::default()
        });
        // Token 1 generated twice: 3.0 - 0.5 - 1.0 = 1.5 < 2.0; prompt tokens do not count.
        assert_eq!(s.sample(&mut [2.0, 3.0], &[1, 1], 2), 0);
        assert_eq!(s.sample(&mut [2.0, 3.0], &[1, 1], 0), 1);
    }

    /// The loop argmax: the first strictly greater value wins.
    fn argmax_reference(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    fn pseudo_logits(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) % 4000) as f32 / 400.0 - 5.0
            })
            .collect()
    }

    #[test]
    fn argmax_is_the_first_largest() {
        for seed in 0..20 {
            // Values repeat (4000 levels over 49k tokens): ties are common.
            let l = pseudo_logits(49_157, seed);
            assert_eq!(argmax(&l), argmax_reference(&l), "seed {seed}");
        }
        assert_eq!(argmax(&[1.0, f32::NAN, 3.0, 3.0, -1.0]), 2);
        assert_eq!(argmax(&[f32::NAN, 5.0]), argmax_reference(&[f32::NAN, 5.0]));
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    /// Top-k by selection, then sorting the k, draws exactly what sorting the whole
    /// vocabulary then cutting draws (the same seeds, with top-p and min-p after it).
    #[test]
    fn top_k_by_selection_equals_a_full_sort() {
        fn full_sort(params: &SamplingParams, logits: &[f32], rng: &mut rand::rngs::StdRng) -> u32 {
            let mut c: Vec<(u32, f32)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l / params.temperature))
                .collect();
            c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            c.truncate(params.top_k);
            let max = c[0].1;
            let mut sum = 0.0f32;
            for x in c.iter_mut() {
                x.1 = (x.1 - max).exp();
                sum += x.1;
            }
            for x in c.iter_mut() {
                x.1 /= sum;
            }
            let mut acc = 0.0;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1;
                if acc >= params.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            let floor = c[0].1 * params.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count().max(1);
            c.truncate(keep);
            let total: f32 = c.iter().map(|x| x.1).sum();
            let mut r = rng.random::<f32>() * total;
            for x in c.iter() {
                r -= x.1;
                if r <= 0.0 {
                    return x.0;
                }
            }
            c[c.len() - 1].0
        }
        for (top_k, top_p, min_p) in [
            (40, 1.0, 0.0),
            (40, 0.9, 0.05),
            (3, 0.5, 0.0),
            (1000, 0.95, 0.0),
        ] {
            let params = SamplingParams {
                temperature: 0.9,
                top_k,
                top_p,
                min_p,
                ..SamplingParams::default()
            };
            let logits = pseudo_logits(49_152, top_k as u32);
            let mut s = Sampler::new(params.clone());
            let mut rng = rand::rngs::StdRng::seed_from_u64(params.seed);
            for _ in 0..50 {
                let want = full_sort(&params, &logits, &mut rng);
                assert_eq!(s.sample(&mut logits.clone(), &[], 0), want, "top-k {top_k}");
            }
        }
    }

    /// Without any cut, the draw over the unsorted vocabulary follows the softmax.
    #[test]
    fn unrestricted_draws_follow_the_softmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        });
        let logits = [0.0f32, (2.0f32).ln(), f32::NEG_INFINITY, (3.0f32).ln()];
        let mut counts = [0usize; 4];
        let n = 6000;
        for _ in 0..n {
            counts[s.sample(&mut logits.clone(), &[], 0) as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        for (i, want) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (3, 3.0 / 6.0)] {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.03, "token {i}: {got} vs {want}");
        }
    }
}
