"""Rule verify: `tinylm verify` (tinylm.verify) on the given folders.

    python workflow_scripts/verify_artifacts.py data artifacts

Re-hashes every file recorded in a meta file's "files" section below them and checks every training
history there; with --expected and --raw-dir (as the rule passes them) also that the config's outputs
exist and that its tokenizer and packed splits were made from its own dataset. Prints the number of
verified files; exits 1 listing every problem: a file missing or changed, a training history out of
order, an output made from data rebuilt since or from another dataset's text.
"""

from tinylm.verify import main

if __name__ == "__main__":
    main()
