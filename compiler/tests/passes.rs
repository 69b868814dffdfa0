//! The passes that build a program, seen one at a time (`kernel::listing_after`): each listing shows
//! what its pass added, and the last one is the finished program's listing.

use cnnc::kernel::{listing, listing_after, program_with, Lowering, Pass, Tier};
use cnnc::weights::Bound;

const MODEL: &str = "model M {
    b = L.BatchNormalization(3)
    c = L.Convolution2D(3, 4, 3)

    forward(x: [3, 9, 9]) {
        h = F.relu(self.b(x))
        h = F.max_pooling_2d(h, 2, stride=2)
        return F.dropout(self.c(h), ratio=0.5)
    }
}";

/// The model unoptimized (so ReLU and dropout stay nodes of their own), with zero parameters.
fn graph() -> (cnnc::ir::Graph, impl Fn() -> Bound) {
    let src = cnnc::diag::Source::new("m.model", MODEL);
    let (g, _) = cnnc::compile(&src).unwrap_or_else(|f| panic!("{}", src.render_plain(&f.0)));
    let bound = Bound::zeros(&g);
    (g, move || bound.clone())
}

#[test]
fn passes_are_named_in_order() {
    let names: Vec<&str> = Pass::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["alias", "lower", "lifetimes", "arena", "slots"]);
    assert!(Pass::ALL.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn each_pass_shows_what_it_added() {
    let (g, bound) = graph();
    for tier in Tier::ALL {
        for batch in [1, 3] {
            let after = |p| listing_after(&g, bound(), batch, Lowering::new(tier), p);
            let alias = after(Pass::Alias);
            // ReLU writes over the batch normalization's output; dropout aliases the convolution's.
            assert!(alias.lines().any(|l| l.contains(".relu -> ") && l.ends_with(".b")), "{alias}");
            assert!(alias.lines().any(|l| l.contains(".dropout -> ") && l.ends_with(".c")), "{alias}");
            assert!(alias.contains("own store"));
            let lower = after(Pass::Lower);
            assert!(lower.starts_with("; after lower\n") && lower.contains("\nkernel ") && !lower.contains("launches "), "{lower}");
            let life = after(Pass::Lifetimes);
            assert!(life.contains(", launches 0..=") && !life.contains("arena["), "{life}");
            let arena = after(Pass::Arena);
            assert!(arena.lines().filter(|l| l.starts_with("; Store(")).all(|l| l.contains(", arena[")), "{arena}");
            // The kernels do not change after lowering.
            let kernels = |s: &str| s.split("\nkernel ").skip(1).map(|k| k[..k.find("\n}\n").expect("closed")].to_owned()).collect::<Vec<_>>();
            assert_eq!(kernels(&lower), kernels(&arena));
            let done = listing(&program_with(&g, bound(), batch, Lowering::new(tier)));
            assert_eq!(after(Pass::Slots), done);
            assert_eq!(kernels(&lower), kernels(&done));
        }
    }
}
