"""``python seeded_maps.py ARGS``: the ``maps`` command with two stand-ins for fixes reported to
the lead (maps/engine/train.py and trainer.py), so the kill test measures resumption itself:

1. ``train()`` does not seed the global RNG from ``cfg.SEED`` before building the model, so two
   runs of one seed start from different weights;
2. the training DataLoader draws its base seed from the global torch RNG when its iterator
   starts (the first ``run_step``, after that iteration's reseed): at iteration 0 of a fresh run
   but at the resume iteration of a resumed one, which shifts the criterion's point sampling.

Delete this file, and call ``maps`` directly in test_kill_resume.py, once both are fixed.
"""
import functools
import sys

if __name__ == "__main__":
    seed = int(sys.argv[sys.argv.index("SEED") + 1]) if "SEED" in sys.argv else 0
    from maps.engine.determinism import reseed_all
    import maps.engine.trainer as trainer_module

    reseed_all(seed)
    trainer_module.build_detection_train_loader = functools.partial(
        trainer_module.build_detection_train_loader, seed=seed)
    from maps.cli import main

    main(args=sys.argv[1:], prog_name="maps")
