from advseg.cli import main

main()
