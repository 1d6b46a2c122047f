//! Safetensors in and out: F32, F16 and BF16 decoded to f32 and checked finite; f32 written
//! with PEFT's `format: pt` metadata.

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error::{PeftError, Result};
use crate::MAX_ADAPTER_BYTES;

/// Parses the safetensors header, after the size limit.
pub(crate) fn open(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    if bytes.len() > MAX_ADAPTER_BYTES {
        return Err(PeftError::TooLarge {
            what: "adapter_model.safetensors".into(),
            found: bytes.len(),
            limit: MAX_ADAPTER_BYTES,
        });
    }
    SafeTensors::deserialize(bytes)
        .map_err(|e| PeftError::Safetensors(format!("not a valid safetensors file: {e}")))
}

/// A tensor's values as f32, refusing other dtypes and NaN or infinite values.
pub fn decode_f32(name: &str, view: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(PeftError::Dtype {
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    // safetensors checks that the data fits the shape; this keeps that a fact here too.
    let expected: usize = view.shape().iter().product();
    if values.len() != expected {
        return Err(PeftError::Safetensors(format!(
            "tensor {name}: {} values for shape {:?}",
            values.len(),
            view.shape()
        )));
    }
    check_finite(name, &values)?;
    Ok(values)
}

pub(crate) fn check_finite(name: &str, values: &[f32]) -> Result<()> {
    if values.iter().any(|x| !x.is_finite()) {
        return Err(PeftError::NonFinite {
            name: name.to_string(),
        });
    }
    Ok(())
}

/// An f32 tensor to write: name, shape, row-major values.
pub(crate) struct F32Tensor<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: &'a [f32],
}

/// Writes f32 tensors as safetensors with the `format: pt` metadata PEFT writes.
pub(crate) fn serialize_f32(tensors: &[F32Tensor<'_>]) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| PeftError::Safetensors(format!("building tensor {}: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = [("format".to_string(), "pt".to_string())]
        .into_iter()
        .collect();
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| PeftError::Safetensors(format!("writing: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(dtype: Dtype, shape: Vec<usize>, bytes: &[u8]) -> Vec<u8> {
        let view = TensorView::new(dtype, shape, bytes).unwrap();
        safetensors::serialize([("t", view)], None).unwrap()
    }

    #[test]
    fn decodes_the_three_float_dtypes() {
        let want = [0.5f32, -2.0, 3.25];
        let f32s: Vec<u8> = want.iter().flat_map(|x| x.to_le_bytes()).collect();
        let f16s: Vec<u8> = want
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = want
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        for (dtype, bytes) in [(Dtype::F32, f32s), (Dtype::F16, f16s), (Dtype::BF16, bf16s)] {
            let file = one(dtype, vec![3], &bytes);
            let st = open(&file).unwrap();
            assert_eq!(decode_f32("t", &st.tensor("t").unwrap()).unwrap(), want);
        }
    }

    #[test]
    fn refuses_other_dtypes_and_non_finite_values() {
        let file = one(Dtype::I32, vec![2], &[0; 8]);
        let st = open(&file).unwrap();
        let e = decode_f32("t", &st.tensor("t").unwrap()).unwrap_err();
        assert!(matches!(e, PeftError::Dtype { .. }), "{e:?}");
        let inf = half::f16::INFINITY.to_le_bytes();
        let file = one(Dtype::F16, vec![1], &inf);
        let st = open(&file).unwrap();
        let e = decode_f32("t", &st.tensor("t").unwrap()).unwrap_err();
        assert_eq!(e, PeftError::NonFinite { name: "t".into() });
        assert!(e.to_string().contains("NaN"));
        assert!(matches!(open(b"garbage"), Err(PeftError::Safetensors(_))));
    }

    #[test]
    fn writes_pt_metadata() {
        let bytes = serialize_f32(&[F32Tensor {
            name: "x".into(),
            shape: vec![1, 2],
            values: &[1.0, 2.0],
        }])
        .unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let format = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"));
    }
}
