"""Build a labelled training tree from many public collections (`cxrbatch data build`).

- `registry`: the reviewed TOML file that lists every source and how its files are labelled;
- `readers`: the files of one source, from a local git mirror, a wheel or a folder;
- `hashing`: pixel ids and the dHashes that find copies across collections;
- `clusters`: near-duplicate and patient links joined into clusters;
- `builder`: conversion, exclusions, the split by cluster and the MANIFEST.csv;
- `output`: the checks on the folder a build replaces (`--out`);
- `record`: a built tree's manifest without the images (`cxrbatch data record`);
- `select`: a labelled folder linking some of a tree's films, by split and source (`cxrbatch data select`).

Nothing here downloads: mirrors are fetched beforehand, and a rebuild of the same mirrors gives
byte-identical output.
"""
