//! Every model in `models/` compiles; its IR dump and layer table are snapshot-tested (insta:
//! review changes with `cargo insta review`, or accept them with `INSTA_UPDATE=always`).

use cnnc_tests::*;

#[test]
fn every_model_snapshot() {
    let models = model_files();
    assert!(!models.is_empty());
    for path in models {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let src = source(&path);
        let (g, warnings) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
        assert!(warnings.is_empty(), "{name}: {}", src.render_plain(&warnings));
        insta::assert_snapshot!(format!("{name}.ir"), cnnc::ir::dump(&g, &src));
        insta::assert_snapshot!(format!("{name}.table"), cnnc::ir::table(&g));
        insta::assert_snapshot!(format!("{name}.ir-opt"), cnnc::ir::dump(&optimized(&g, 1), &src));
    }
}

#[test]
fn alexbn_macs_are_exact() {
    let src = source(&root().join("models/alexbn.model"));
    let (g, _) = cnnc::compile(&src).unwrap();
    assert_eq!(g.macs(), 1_135_256_096);
    assert_eq!(g.params().iter().map(|p| p.shape.iter().product::<usize>()).sum::<usize>(), 62_379_752);
}

/// Issue 2 fixes `models/alexbn.model` (bundled into the binary) to exactly this text.
#[test]
fn alexbn_model_is_the_specified_text() {
    let spec = "# Chainer's AlexBN: single-GPU AlexNet with LRN replaced by BatchNormalization.
model AlexBN {
    conv1 = L.Convolution2D(3,  96, 11, stride=4)
    bn1   = L.BatchNormalization(96)
    conv2 = L.Convolution2D(96, 256,  5, pad=2)
    bn2   = L.BatchNormalization(256)
    conv3 = L.Convolution2D(256, 384,  3, pad=1)
    conv4 = L.Convolution2D(384, 384,  3, pad=1)
    conv5 = L.Convolution2D(384, 256,  3, pad=1)
    fc6   = L.Linear(9216, 4096)
    fc7   = L.Linear(4096, 4096)
    fc8   = L.Linear(4096, 1000)

    forward(x: [3, 227, 227]) {
        h = F.max_pooling_2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2)
        h = F.max_pooling_2d(F.relu(self.bn2(self.conv2(h))), 3, stride=2)
        h = F.relu(self.conv3(h))
        h = F.relu(self.conv4(h))
        h = F.max_pooling_2d(F.relu(self.conv5(h)), 3, stride=2)
        h = F.dropout(F.relu(self.fc6(h)))
        h = F.dropout(F.relu(self.fc7(h)))
        return self.fc8(h)
    }
}
";
    assert_eq!(cnnc::ALEXBN, spec);
}

/// cover_all=True changes pooled sizes at 224 (not at 227): 224 → conv1 54 → pool 27 (floor would give 26).
#[test]
fn cover_all_changes_sizes_at_224() {
    let text = cnnc::ALEXBN.replace("[3, 227, 227]", "[3, 224, 224]").replace("9216", "None");
    let (g, _) = cnnc::compile(&cnnc::diag::Source::new("alexbn224", text)).unwrap();
    let pools: Vec<Vec<usize>> = g.nodes().filter(|(_, n)| n.layer == "F.max_pooling_2d").map(|(_, n)| n.shape.clone()).collect();
    assert_eq!(pools, vec![vec![96, 27, 27], vec![256, 13, 13], vec![256, 6, 6]]);
}
