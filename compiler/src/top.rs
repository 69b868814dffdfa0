//! What a classifier's outputs mean: per sample, the classes ranked by logit with their softmax
//! probabilities and, for 1000-class models, ImageNet's names. The CLI's `run` and the Python package's
//! `Model.top` both print from here. Invariant: ties rank the lower class index first.

use crate::ir::{Graph, Kind};
use cnnc_runtime::{Op, Tensor};

/// One ranked class of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    pub index: usize,
    /// ImageNet's name for the class, when the model has 1000 classes.
    pub name: Option<&'static str>,
    pub probability: f64,
    pub logit: f32,
}

const IMAGENET: &str = include_str!("../data/imagenet_classes.txt");

/// Whether the model's outputs are already probabilities: it ends in softmax (looking through dropout,
/// an identity at inference).
pub fn ends_in_softmax(g: &Graph) -> bool {
    let mut last = g.output;
    while let (Kind::Op(Op::Dropout { .. }), [arg]) = (&g.node(last).kind, g.args(last).as_slice()) {
        last = *arg;
    }
    matches!(&g.node(last).kind, Kind::Op(Op::Softmax { .. }))
}

/// The `k` best classes of every sample of `y` (shape (N, classes)); `None` if `y` is not a batch of
/// vectors of class scores.
pub fn top(g: &Graph, y: &Tensor, k: usize) -> Option<Vec<Vec<Class>>> {
    let &[_, classes] = y.shape() else { return None };
    let names: Vec<&'static str> = if classes == 1000 { IMAGENET.lines().collect() } else { vec![] };
    let softmax = !ends_in_softmax(g);
    let rank = |row: &[f32]| {
        let probs: Vec<f64> = if softmax {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        } else {
            row.iter().map(|&v| v as f64).collect()
        };
        let mut idx: Vec<usize> = (0..classes).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.into_iter().map(|i| Class { index: i, name: names.get(i).copied(), probability: probs[i], logit: row[i] }).collect()
    };
    Some(y.data().chunks(classes.max(1)).map(rank).collect())
}
