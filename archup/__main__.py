from archup.cli import main

main()
