from maps.cli import main

main(prog_name="maps")
