//! What a sequence keeps between decode steps. The caller owns the
//! `DecodeState`, so one loaded model serves many sequences.

pub mod policy;

use crate::attention::MixerState;
use crate::error::Result;
use candle_core::Tensor;

/// Per decoder layer: the self-attention state and, for encoder–decoder
/// models, the cross-attention keys/values of the encoder memory.
#[derive(Clone, Debug)]
pub struct LayerState {
    pub mixer: MixerState,
    pub cross_kv: Option<(Tensor, Tensor)>,
}

#[derive(Clone, Debug)]
pub struct DecodeState {
    pub layers: Vec<LayerState>,
    /// Tokens consumed so far (the position of the next token).
    pub pos: usize,
    /// (b, s) padding mask of the encoder memory, 1 = token.
    pub memory_padding: Option<Tensor>,
    /// The KV cache of the fused decode path (`exec::decoder`), used instead
    /// of `layers` when the model has one and the batch is 1.
    pub fused: Option<crate::exec::decoder::FusedKv>,
}

impl DecodeState {
    /// Bytes held by the self-attention states (KV caches, rings, recurrent
    /// states); the memory axis
    /// of the trade-offs attend reports.
    pub fn state_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.mixer.state_bytes())
            .sum::<usize>()
            + self.fused.as_ref().map_or(0, |f| f.state_bytes())
    }

    /// The policy-capped caches of the layers that have one, fused or not.
    pub fn policy_caches(&self) -> Vec<&policy::PolicyCache> {
        match self.fused.as_ref().and_then(|f| f.policy.as_ref()) {
            Some(p) => p.iter().collect(),
            None => self
                .layers
                .iter()
                .filter_map(|l| match &l.mixer {
                    MixerState::Policy(c) => Some(c),
                    _ => None,
                })
                .collect(),
        }
    }

    /// As `policy_caches`, mutable.
    pub fn policy_caches_mut(&mut self) -> Vec<&mut policy::PolicyCache> {
        match self.fused.as_mut().and_then(|f| f.policy.as_mut()) {
            Some(p) => p.iter_mut().collect(),
            None => self
                .layers
                .iter_mut()
                .filter_map(|l| match &mut l.mixer {
                    MixerState::Policy(c) => Some(c),
                    _ => None,
                })
                .collect(),
        }
    }

    /// Keep only sequences `idx` (in that order), e.g. to reorder beams.
    pub fn select(&mut self, idx: &[u32]) -> Result<()> {
        if let Some(f) = &self.fused {
            if f.is_empty() {
                self.fused = None; // batched use from the start: composed path
            } else if idx != [0] {
                return Err(crate::error::Error::msg(
                    "the fused decode state holds one sequence; it cannot be reordered",
                ));
            }
        }
        let Some(first) = self.layers.first() else {
            return Ok(());
        };
        let dev = self
            .layers
            .iter()
            .find_map(|l| l.mixer.device())
            .or_else(|| first.cross_kv.as_ref().map(|kv| kv.0.device().clone()))
            .unwrap_or(candle_core::Device::Cpu);
        let idx = Tensor::new(idx, &dev)?;
        for l in &mut self.layers {
            l.mixer.select(&idx)?;
            if let Some((k, v)) = &l.cross_kv {
                l.cross_kv = Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?));
            }
        }
        if let Some(p) = &self.memory_padding {
            self.memory_padding = Some(p.index_select(&idx, 0)?);
        }
        Ok(())
    }
}
