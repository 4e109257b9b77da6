from marco.cli import main

main()
