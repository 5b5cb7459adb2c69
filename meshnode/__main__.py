"""``python -m meshnode``: the same command line as the ``meshnode`` script. Nothing else."""

if __name__ == "__main__":
    from meshnode.cli import main

    main()
