//! A validated LoRA adapter: per adapted layer and projection, `A` [r, in] and `B` [out, r],
//! applied as `W x + scale · B (A x)`.

use std::collections::{BTreeMap, BTreeSet};

use safetensors::tensor::TensorView;

use crate::config::{check_rank, AdapterOrigin, LoraConfig, PeftConfig};
use crate::error::{PeftError, Result};
use crate::keys::{LoraKey, LoraMatrix};
use crate::shape::{LoraTarget, ModelShape};
use crate::summary::AdapterSummary;
use crate::tensors;

/// The LoRA matrices of one projection of one layer, in PEFT's (Hugging Face) layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraBlock {
    pub layer: usize,
    pub target: LoraTarget,
    /// A, [r, in] row-major.
    pub a: Vec<f32>,
    /// B, [out, r] row-major.
    pub b: Vec<f32>,
}

impl LoraBlock {
    /// Checks the block's sizes for `rank` on `shape`, and that its values are finite.
    pub fn check(&self, rank: usize, shape: &ModelShape) -> Result<()> {
        if self.layer >= shape.num_layers {
            return Err(PeftError::LayerOutOfRange {
                at: self.key(LoraMatrix::A).format(),
                layer: self.layer,
                num_layers: shape.num_layers,
            });
        }
        let (fin, fout) = shape.dims(self.target);
        for (matrix, values, dims) in [
            (LoraMatrix::A, &self.a, [rank, fin]),
            (LoraMatrix::B, &self.b, [fout, rank]),
        ] {
            let name = self.key(matrix).format();
            if Some(values.len()) != dims[0].checked_mul(dims[1]) {
                return Err(PeftError::Shape {
                    name,
                    found: vec![values.len()],
                    expected: dims.to_vec(),
                });
            }
            tensors::check_finite(&name, values)?;
        }
        Ok(())
    }

    pub fn key(&self, matrix: LoraMatrix) -> LoraKey {
        LoraKey::new(self.layer, self.target, matrix)
    }
}

/// A LoRA that fits its model: exactly one block per (adapted layer, target module), every
/// block of rank `r`, finite.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    config: LoraConfig,
    /// Sorted by (layer, target).
    blocks: Vec<LoraBlock>,
    shape: ModelShape,
}

impl LoraAdapter {
    /// Checks `blocks` against `config` and `shape`: one block for each layer of
    /// `layers_to_transform` (every layer when `None`) and each of `target_modules`, none
    /// other, each of rank `r`. The config's lists are normalised (sorted, deduplicated).
    pub fn new(
        mut config: LoraConfig,
        mut blocks: Vec<LoraBlock>,
        shape: &ModelShape,
    ) -> Result<Self> {
        normalise_config(&mut config, shape)?;
        blocks.sort_by_key(|b| (b.layer, b.target));
        let expected = adapted(&config, shape);
        let mut given = BTreeSet::new();
        for b in &blocks {
            let name = b.key(LoraMatrix::A).format();
            if b.layer >= shape.num_layers {
                return Err(PeftError::LayerOutOfRange {
                    at: name,
                    layer: b.layer,
                    num_layers: shape.num_layers,
                });
            }
            if !expected.contains(&(b.layer, b.target)) {
                return Err(PeftError::UnexpectedTensor {
                    name,
                    reason: not_adapted_reason(&config, b.layer, b.target),
                });
            }
            if !given.insert((b.layer, b.target)) {
                return Err(PeftError::UnexpectedTensor {
                    name,
                    reason: "given twice".into(),
                });
            }
            b.check(config.r, shape)?;
        }
        if let Some(&(layer, target)) = expected.difference(&given).next() {
            return Err(PeftError::MissingTensor(
                LoraKey::new(layer, target, LoraMatrix::A).format(),
            ));
        }
        Ok(Self {
            config,
            blocks,
            shape: *shape,
        })
    }

    /// Reads and validates `adapter_config.json` (as text) and `adapter_model.safetensors`.
    pub fn from_peft(config_json: &str, safetensors: &[u8], shape: &ModelShape) -> Result<Self> {
        match PeftConfig::from_json(config_json)? {
            PeftConfig::Lora(config) => Self::from_config(config, safetensors, shape),
            other => Err(PeftError::PeftType {
                found: other.peft_type().as_str().into(),
                expected: "LORA",
            }),
        }
    }

    pub(crate) fn from_config(
        config: LoraConfig,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<Self> {
        Self::read_config(config, safetensors, shape, true)
    }

    /// [`Self::from_config`]'s checks and summary without keeping the decoded matrices: one
    /// block is decoded at a time, so checking an upload never holds a second copy of it.
    pub(crate) fn check_config(
        config: LoraConfig,
        safetensors: &[u8],
        shape: &ModelShape,
    ) -> Result<AdapterSummary> {
        Self::read_config(config, safetensors, shape, false).map(|l| l.summary())
    }

    /// Reads the blocks; `keep: false` decodes and checks each, then drops it (the result
    /// then has no blocks, only the normalised config, for its summary).
    fn read_config(
        mut config: LoraConfig,
        safetensors: &[u8],
        shape: &ModelShape,
        keep: bool,
    ) -> Result<Self> {
        // The config's own claims first, so that the error names the config field.
        if let Some(layers) = &config.layers_to_transform {
            check_layers(layers, shape)?;
        }
        let st = tensors::open(safetensors)?;
        let expected = adapted(&config, shape);
        let mut found: BTreeMap<LoraKey, (String, TensorView<'_>)> = BTreeMap::new();
        let mut names = st.names();
        names.sort();
        for name in names {
            let key = LoraKey::parse(name).ok_or_else(|| PeftError::UnexpectedTensor {
                name: name.to_string(),
                reason: "not a lora_A/lora_B weight of a Llama projection".into(),
            })?;
            if key.layer >= shape.num_layers {
                return Err(PeftError::LayerOutOfRange {
                    at: name.to_string(),
                    layer: key.layer,
                    num_layers: shape.num_layers,
                });
            }
            if !expected.contains(&(key.layer, key.target)) {
                return Err(PeftError::UnexpectedTensor {
                    name: name.to_string(),
                    reason: not_adapted_reason(&config, key.layer, key.target),
                });
            }
            let view = st
                .tensor(name)
                .map_err(|e| PeftError::Safetensors(format!("tensor {name}: {e}")))?;
            if let Some((first, _)) = found.insert(key, (name.to_string(), view)) {
                return Err(PeftError::UnexpectedTensor {
                    name: name.to_string(),
                    reason: format!("the same matrix as {first}"),
                });
            }
        }
        let r = config.r;
        let mut blocks = Vec::with_capacity(expected.len());
        for &(layer, target) in &expected {
            let (fin, fout) = shape.dims(target);
            let mut read = |matrix, dims: [usize; 2]| {
                let key = LoraKey::new(layer, target, matrix);
                let (name, view) = found
                    .remove(&key)
                    .ok_or_else(|| PeftError::MissingTensor(key.format()))?;
                if view.shape() != dims {
                    return Err(PeftError::Shape {
                        name,
                        found: view.shape().to_vec(),
                        expected: dims.to_vec(),
                    });
                }
                tensors::decode_f32(&name, &view)
            };
            let a = read(LoraMatrix::A, [r, fin])?;
            let b = read(LoraMatrix::B, [fout, r])?;
            if keep {
                blocks.push(LoraBlock {
                    layer,
                    target,
                    a,
                    b,
                });
            }
        }
        if keep {
            return Self::new(config, blocks, shape);
        }
        // What `new` checks beyond the config holds by construction here: every block was
        // read for an expected (layer, target), once, with its dims, decoded finite.
        normalise_config(&mut config, shape)?;
        Ok(Self {
            config,
            blocks: Vec::new(),
            shape: *shape,
        })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }
    pub fn rank(&self) -> usize {
        self.config.r
    }
    pub fn alpha(&self) -> f64 {
        self.config.lora_alpha
    }
    /// What the runtime multiplies `B (A x)` by.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }
    pub fn targets(&self) -> &[LoraTarget] {
        &self.config.target_modules
    }
    /// The adapted layers, ascending.
    pub fn layers(&self) -> Vec<usize> {
        match &self.config.layers_to_transform {
            Some(l) => l.clone(),
            None => (0..self.shape.num_layers).collect(),
        }
    }
    /// Sorted by (layer, target).
    pub fn blocks(&self) -> &[LoraBlock] {
        &self.blocks
    }
    pub fn into_blocks(self) -> Vec<LoraBlock> {
        self.blocks
    }
    pub fn block(&self, layer: usize, target: LoraTarget) -> Option<&LoraBlock> {
        self.blocks
            .binary_search_by_key(&(layer, target), |b| (b.layer, b.target))
            .ok()
            .map(|i| &self.blocks[i])
    }
    /// The shape it was validated against.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }
    pub fn origin(&self) -> &AdapterOrigin {
        &self.config.origin
    }

    pub fn summary(&self) -> AdapterSummary {
        let mut target_modules: Vec<String> = self
            .targets()
            .iter()
            .map(|t| t.name().to_string())
            .collect();
        // Alphabetical, as registration has always reported them.
        target_modules.sort();
        AdapterSummary::Lora {
            r: self.rank(),
            alpha: self.alpha(),
            scale: self.scale(),
            target_modules,
            num_layers: self.layers().len(),
            layers_to_transform: self.config.layers_to_transform.clone(),
        }
    }
}

/// The config's own checks, with its lists sorted and deduplicated.
fn normalise_config(config: &mut LoraConfig, shape: &ModelShape) -> Result<()> {
    check_rank(config.r)?;
    if !config.lora_alpha.is_finite() {
        return Err(PeftError::field_error(
            "lora_alpha",
            "must be a finite number",
        ));
    }
    config.target_modules.sort();
    config.target_modules.dedup();
    if config.target_modules.is_empty() {
        return Err(PeftError::field_error("target_modules", "is empty"));
    }
    if let Some(layers) = &mut config.layers_to_transform {
        layers.sort_unstable();
        layers.dedup();
        check_layers(layers, shape)?;
    }
    Ok(())
}

fn check_layers(layers: &[usize], shape: &ModelShape) -> Result<()> {
    match layers.iter().find(|l| **l >= shape.num_layers) {
        Some(&layer) => Err(PeftError::LayerOutOfRange {
            at: "layers_to_transform".into(),
            layer,
            num_layers: shape.num_layers,
        }),
        None => Ok(()),
    }
}

/// Every (layer, target) the config adapts on `shape`, in (layer, target) order.
fn adapted(config: &LoraConfig, shape: &ModelShape) -> BTreeSet<(usize, LoraTarget)> {
    let layers: Vec<usize> = match &config.layers_to_transform {
        Some(l) => l.clone(),
        None => (0..shape.num_layers).collect(),
    };
    layers
        .into_iter()
        .flat_map(|l| config.target_modules.iter().map(move |t| (l, *t)))
        .collect()
}

fn not_adapted_reason(config: &LoraConfig, layer: usize, target: LoraTarget) -> String {
    if !config.target_modules.contains(&target) {
        format!("{target} is not in target_modules")
    } else {
        format!("layer {layer} is not in layers_to_transform")
    }
}
