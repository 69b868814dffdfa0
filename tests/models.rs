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

#[test]
fn bundled_model_is_the_file() {
    assert_eq!(cnnc::ALEXBN, std::fs::read_to_string(root().join("models/alexbn.model")).unwrap());
}

/// cover_all=True changes pooled sizes at 224 (not at 227): 224 → conv1 54 → pool 27 (floor would give 26).
#[test]
fn cover_all_changes_sizes_at_224() {
    let text = cnnc::ALEXBN.replace("[3, 227, 227]", "[3, 224, 224]").replace("9216", "None");
    let (g, _) = cnnc::compile(&cnnc::diag::Source::new("alexbn224", text)).unwrap();
    let pools: Vec<Vec<usize>> = g.nodes().filter(|(_, n)| n.layer == "F.max_pooling_2d").map(|(_, n)| n.shape.clone()).collect();
    assert_eq!(pools, vec![vec![96, 27, 27], vec![256, 13, 13], vec![256, 6, 6]]);
}
