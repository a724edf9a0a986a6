from snapmgr.cli import main

main()
