"""Run retrikt from a checkout without installing it: `python cli.py run jobs/demo.yaml`."""

from retrikt_ray.cli import main

if __name__ == "__main__":
    main()
