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

    /// Roll back to the first n tokens (speculative decoding: forget the
    /// rejected draft tokens) when every layer can: plain KV caches,
    /// contiguous or paged. Ok(false), the state untouched, when a layer
    /// cannot (a ring window, a policy cache, a recurrent state: the
    /// caller restores a copy instead).
    pub fn truncate(&mut self, n: usize) -> Result<bool> {
        if n > self.pos {
            return Err(crate::error::Error::msg(format!(
                "cannot roll back to {n} tokens: the state holds {}",
                self.pos
            )));
        }
        if !self.can_truncate() {
            return Ok(false);
        }
        for l in &mut self.layers {
            if let MixerState::Kv(cs) = &mut l.mixer {
                for c in cs {
                    c.truncate(n)?;
                }
            }
        }
        self.pos = n;
        Ok(true)
    }

    /// Whether `truncate` can roll this state back: every layer a plain
    /// KV cache (contiguous, or paged, windows included).
    pub fn can_truncate(&self) -> bool {
        self.layers.iter().all(|l| match &l.mixer {
            MixerState::Kv(cs) => cs.iter().all(KvCache::can_truncate),
            _ => false,
        })
    }

    /// Make steps of several tokens compute each position as a one-token
    /// step would (`KvCache::one_by_one`): speculative verification.
    pub fn set_one_by_one(&mut self, on: bool) {
        for l in &mut self.layers {
            if let MixerState::Kv(cs) = &mut l.mixer {
                for c in cs {
                    c.one_by_one = on;
                }
            }
        }
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
