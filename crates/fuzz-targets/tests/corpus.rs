//! Every input in `fuzz/corpus/<target>/` (seeds, and what fuzzing found worth
//! keeping) run through its target, as the fuzzer runs it. A target with no corpus
//! fails: the replay must never pass by finding nothing.

use std::path::Path;

#[test]
fn the_fuzz_corpus_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, target) in corral_fuzz_targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(
            inputs.len() >= 3,
            "{name}: only {} inputs in {}",
            inputs.len(),
            dir.display()
        );
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(outcome.is_ok(), "{name}: {} fails", input.display());
        }
        println!("{name}: {} inputs", inputs.len());
    }
}
