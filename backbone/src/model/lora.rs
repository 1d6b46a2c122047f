//! Per-row LoRA: every row of a batch carries its own adapter (or none), applied unmerged,
//! `W x + scale · B (A x)`, by one kernel for prefill chunks and decode steps alike.
//!
//! A LoRA delta is a sliver of a layer's work (rank 4 on q and v: ~0.2% of the multiply-adds),
//! so it is computed row by row over plain slices: a dot product per rank against each
//! position, then one scaled row of B per rank added to the output. The same loop serves rows
//! that share one adapter and rows that each have their own, so mixing experts in a batch costs
//! nothing beyond the (tiny) adapters themselves; nothing is stacked or padded per batch.

use candle_core::Tensor;

use super::decode::{dot, with_f32};
use crate::error::{BackboneError, Result};
use crate::experts::{Lora, LoraPair, LoraTarget};
use crate::kernels::SharedOut;

/// Positions per parallel task of [`add_lora`].
const POSITIONS_PER_TASK: usize = 32;
/// Below this many multiply-adds a delta runs on the calling thread (decode steps).
const PARALLEL_WORK: usize = 1 << 18;

/// The adapters of each row of a batch, per layer and projection.
#[derive(Debug, Clone, Default)]
pub struct LoraBatch {
    /// slots[layer][target]: each row's pair, or None when no row adapts that projection.
    slots: Vec<[Option<Vec<Option<LoraPair>>>; 7]>,
    batch: usize,
}

impl LoraBatch {
    /// No LoRA on any row.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn is_none(&self) -> bool {
        self.slots.is_empty()
    }

    /// Rows this batch was built for (0 for [`LoraBatch::none`]).
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Build for the rows of a batch (`None`: the bare backbone for that row). Cheap: the
    /// adapters' weights are shared, not copied.
    pub fn new(rows: &[Option<&Lora>]) -> Result<Self> {
        let Some(num_layers) = rows.iter().flatten().map(|l| l.num_layers()).max() else {
            return Ok(Self::none());
        };
        let slots = (0..num_layers)
            .map(|li| {
                LoraTarget::ALL.map(|target| {
                    let pairs: Vec<Option<LoraPair>> = rows
                        .iter()
                        .map(|r| r.and_then(|l| l.pair(li, target)).cloned())
                        .collect();
                    pairs.iter().any(Option::is_some).then_some(pairs)
                })
            })
            .collect();
        Ok(Self {
            slots,
            batch: rows.len(),
        })
    }

    /// Each row's adapter for one projection, or None when no row adapts it.
    pub(super) fn rows(&self, layer: usize, target: LoraTarget) -> Option<&[Option<LoraPair>]> {
        self.slots.get(layer)?[target.index()].as_deref()
    }

    /// `scale · B(A x)` for x [b, t, in] (prefill), or None when no row adapts this
    /// projection.
    pub(super) fn delta(
        &self,
        layer: usize,
        target: LoraTarget,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(rows) = self.rows(layer, target) else {
            return Ok(None);
        };
        let (b, t, _) = x.dims3()?;
        let fout = rows
            .iter()
            .flatten()
            .map(|p| p.fout)
            .next()
            .unwrap_or_default();
        let x = x.contiguous()?;
        let mut out = vec![0f32; b * t * fout];
        with_f32(&x, |xs| add_lora(rows, xs, t, &mut out))??;
        Ok(Some(Tensor::from_vec(out, (b, t, fout), x.device())?))
    }
}

/// `out[p] += scale · B(A x[p])` with the adapter of row `p / t`, for x [rows.len() · t, in]
/// and out [rows.len() · t, out] (row-major). Rows without an adapter are left alone.
pub(super) fn add_lora(
    rows: &[Option<LoraPair>],
    x: &[f32],
    t: usize,
    out: &mut [f32],
) -> Result<()> {
    let positions = rows.len() * t;
    let Some(first) = rows.iter().flatten().next() else {
        return Ok(());
    };
    let (fin, fout) = (first.fin, first.fout);
    if x.len() != positions * fin || out.len() != positions * fout {
        return Err(BackboneError::InvalidInput(format!(
            "LoRA input {} / output {} values for {positions} positions of {fin} -> {fout}",
            x.len(),
            out.len()
        )));
    }
    if let Some(p) = rows
        .iter()
        .flatten()
        .find(|p| p.fin != fin || p.fout != fout)
    {
        return Err(BackboneError::InvalidInput(format!(
            "rows of one batch adapt a projection as {fin} -> {fout} and {} -> {}",
            p.fin, p.fout
        )));
    }
    let max_rank = rows.iter().flatten().map(|p| p.rank).max().unwrap_or(0);
    let span = |p0: usize, p1: usize, out: &mut [f32]| {
        let mut h = vec![0f32; max_rank];
        for (p, o) in (p0..p1).zip(out.chunks_exact_mut(fout)) {
            let Some(pair) = &rows[p / t] else { continue };
            let xp = &x[p * fin..(p + 1) * fin];
            for (c, hc) in h.iter_mut().enumerate().take(pair.rank) {
                *hc = dot(&pair.a[c * fin..(c + 1) * fin], xp);
            }
            for (c, &hc) in h.iter().enumerate().take(pair.rank) {
                for (ov, &bv) in o.iter_mut().zip(&pair.b_t[c * fout..(c + 1) * fout]) {
                    *ov += hc * bv;
                }
            }
        }
    };
    if positions * max_rank * (fin + fout) < PARALLEL_WORK {
        span(0, positions, out);
        return Ok(());
    }
    let base = SharedOut(out.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(
        positions.div_ceil(POSITIONS_PER_TASK),
        |tasks| {
            for ti in tasks {
                let (p0, p1) = (
                    ti * POSITIONS_PER_TASK,
                    positions.min((ti + 1) * POSITIONS_PER_TASK),
                );
                // SAFETY: tasks cover disjoint position ranges of `out`, which holds
                // positions * fout values and outlives the call.
                let o =
                    unsafe { std::slice::from_raw_parts_mut(base.at(p0 * fout), (p1 - p0) * fout) };
                span(p0, p1, o);
            }
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rank: usize, fin: usize, fout: usize, seed: usize) -> LoraPair {
        let val = |i: usize| (((i * 37 + seed * 11) % 23) as f32 - 11.0) * 0.01;
        LoraPair {
            a: (0..rank * fin).map(val).collect::<Vec<_>>().into(),
            b_t: (0..rank * fout)
                .map(|i| val(i + 5))
                .collect::<Vec<_>>()
                .into(),
            rank,
            fin,
            fout,
        }
    }

    /// out[p] += b_t^T (a x[p]) computed the plain way.
    fn naive(rows: &[Option<LoraPair>], x: &[f32], t: usize, out: &mut [f32]) {
        for (p, o) in out
            .chunks_exact_mut(rows.iter().flatten().next().unwrap().fout)
            .enumerate()
        {
            let Some(pr) = &rows[p / t] else { continue };
            let xp = &x[p * pr.fin..(p + 1) * pr.fin];
            for c in 0..pr.rank {
                let h: f32 = (0..pr.fin).map(|i| pr.a[c * pr.fin + i] * xp[i]).sum();
                for (j, ov) in o.iter_mut().enumerate() {
                    *ov += h * pr.b_t[c * pr.fout + j];
                }
            }
        }
    }

    fn check(t: usize) {
        let (fin, fout) = (40, 24);
        // Two adapters of different ranks, a row without one, the first adapter again.
        let rows = vec![
            Some(pair(4, fin, fout, 1)),
            Some(pair(2, fin, fout, 2)),
            None,
            Some(pair(4, fin, fout, 1)),
        ];
        let x: Vec<f32> = (0..rows.len() * t * fin)
            .map(|i| ((i * 13 % 31) as f32 - 15.0) * 0.1)
            .collect();
        let base: Vec<f32> = (0..rows.len() * t * fout).map(|i| i as f32 * 0.5).collect();
        let mut got = base.clone();
        add_lora(&rows, &x, t, &mut got).unwrap();
        let mut want = base.clone();
        naive(&rows, &x, t, &mut want);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{i}: {g} vs {w}");
        }
        // The row without an adapter is untouched; the others moved.
        let row = |r: usize, v: &[f32]| v[r * t * fout..(r + 1) * t * fout].to_vec();
        assert_eq!(row(2, &got), row(2, &base));
        assert_ne!(row(1, &got), row(1, &base));
    }

    #[test]
    fn per_row_adapters_match_the_plain_computation() {
        check(1); // decode step: the calling thread
        check(3);
        check(600); // enough work for the worker pool
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let rows = vec![Some(pair(4, 8, 6, 1)), Some(pair(4, 8, 5, 2))];
        let x = vec![0f32; 2 * 8];
        assert!(add_lora(&rows, &x, 1, &mut [0f32; 2 * 6]).is_err());
        let rows = vec![Some(pair(4, 8, 6, 1))];
        assert!(add_lora(&rows, &x, 1, &mut [0f32; 6]).is_err());
        // No adapter on any row: nothing to do.
        let mut out = vec![1f32; 6];
        add_lora(&[None], &x[..8], 1, &mut out).unwrap();
        assert_eq!(out, vec![1f32; 6]);
    }
}
