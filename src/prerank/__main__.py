from prerank.cli import main

main()
