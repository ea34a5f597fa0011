"""Rule verify: re-hash every file recorded in a meta file's "files" section below the given folders.

    python workflow_scripts/verify_artifacts.py data artifacts

Prints the number of verified files; exits 1 listing every missing or changed file.
"""

from tinylm.verify import main

if __name__ == "__main__":
    main()
