"""Entry point: ``python train.py`` runs the main job; see ``python train.py --help``."""

from lightning_lopt.cli import main

if __name__ == "__main__":
    main()
