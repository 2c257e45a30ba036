//! What a sequence keeps between decode steps. The caller owns the
//! `DecodeState`, so one loaded model serves many sequences.

use crate::attention::MixerState;
use crate::cache::kv::KvCache;
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
}

impl DecodeState {
    /// Bytes held by the self-attention states (KV caches, rings, recurrent
    /// states): the memory axis of the trade-offs attend reports.
    pub fn state_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.mixer.state_bytes()).sum()
    }

    /// The policy-capped KV caches, one per softmax layer that has one.
    pub fn policy_caches(&self) -> Vec<&KvCache> {
        self.layers
            .iter()
            .filter_map(|l| match &l.mixer {
                MixerState::Kv(c) => c.first().filter(|c| c.policy.is_some()),
                _ => None,
            })
            .collect()
    }

    /// As `policy_caches`, mutable.
    pub fn policy_caches_mut(&mut self) -> Vec<&mut KvCache> {
        self.layers
            .iter_mut()
            .filter_map(|l| match &mut l.mixer {
                MixerState::Kv(c) => c.first_mut().filter(|c| c.policy.is_some()),
                _ => None,
            })
            .collect()
    }

    /// Keep only sequences `idx` (in that order), e.g. to reorder beams.
    pub fn select(&mut self, idx: &[u32]) -> Result<()> {
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
