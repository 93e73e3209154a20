export { snappyUncompress, snappyUncompressor } from './uncompress.js'
export { snappyCompress, snappyCompressor } from './compress.js'
