"""Exploration of feature space on magnetic tile (issue 10): the figures in BENCHMARKS.md, "Feature space:
exploration". Not product code: a research loop over cached backbone tokens, using the project's modules.

    python scripts/feature_study.py knn    224                      # kNN variants (normalisation, memory size)
    python scripts/feature_study.py train  224 --minutes 12 --tag T --set train.mask_mode=mixed \
                                                --set scoring.normalize=position   # a feature MAE on cached tokens
    python scripts/feature_study.py fuse   224 T                    # its maps alone and fused with kNN maps

Every figure here is on the TEST split of the development set, so choices made from them are tuning on its labels.
"""
import sys, time, json, math
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from mae_ad import data as D, metrics as M
from mae_ad.config import Config, BackboneConfig, config_from_dict
from mae_ad.backbone import FeatureTokenizer
from mae_ad.evaluate import _load_test_set
from mae_ad.scoring import gaussian_blur, gaussian_kernel1d
torch.set_num_threads(2)
ROOT=str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'shared/data/magnetic_tile')
CMD=sys.argv[1]
SIZE=int(sys.argv[2]) if len(sys.argv)>2 else 224
RUNS=__import__('pathlib').Path('runs/study'); RUNS.mkdir(parents=True, exist_ok=True)
idx=D.index_dataset(ROOT, need_test=True)
tr, ho = D.split_holdout(idx.train, 0.2, 4, seed=0)
cache=str(RUNS / f'cache_{SIZE}.pt')
try:
    C=torch.load(cache, weights_only=True)
except FileNotFoundError:
    t=time.time()
    Xtr=torch.from_numpy(D.load_stack(tr,SIZE)); Xho=torch.from_numpy(D.load_stack(ho,SIZE))
    Xte,masks,hasm=_load_test_set(idx.test,SIZE)
    C=dict(Xtr=Xtr,Xho=Xho,Xte=torch.from_numpy(Xte),masks=torch.from_numpy(masks),labels=torch.tensor([s.label for s in idx.test]),types=[s.defect for s in idx.test])
    torch.save(C,cache); print('loaded',time.time()-t)
def feats(layers=(2,3), stride=8, local=3, name='efficientnet_lite0'):
    key=str(RUNS) + f'/f_{SIZE}_{name}_{"".join(map(str,layers))}_{stride}_{local}.pt'
    try: return torch.load(key, weights_only=True)
    except FileNotFoundError: pass
    ft=FeatureTokenizer(BackboneConfig(name=name,layers=list(layers),stride=stride,local=local),SIZE); ft.load_source_weights()
    out={}
    with torch.no_grad():
        for k in ('Xtr','Xho','Xte'):
            out[k]=torch.cat([ft.raw_features(C[k][i:i+16]) for i in range(0,len(C[k]),16)])
    torch.save(out,key); return out
def metrics(maps, scores, tag):
    lab=C['labels'].numpy(); mk=C['masks'].numpy(); mp=maps.numpy()[:,0]
    r=dict(img=M.auroc(lab,scores.numpy()), pix=M.pixel_auroc(mk,mp), pro=M.aupro(mk,mp))
    types=C['types']; per={}
    for t in sorted(set(types)-{'good'}):
        sel=np.array([x in ('good',t) for x in types]); per[t]=round(M.auroc(lab[sel],scores.numpy()[sel]),3)
    # spearman of good scores vs width not available here
    print(f"{tag:50s} img {r['img']:.3f} pix {r['pix']:.3f} pro {r['pro']:.3f} {per}", flush=True)
    return r
def to_map(cellmap, sigma=4):
    m=F.interpolate(cellmap, size=(SIZE,SIZE), mode='bilinear', align_corners=False)
    if sigma>0: m=gaussian_blur(m, gaussian_kernel1d(sigma, SIZE-1))
    return m


if CMD == 'knn':
    import mae_ad.backbone as B
    def knn_maps(Ftr, Fte):
        mem=Ftr.permute(0,2,3,1).reshape(-1,Ftr.shape[1]); out=[]
        for i in range(len(Fte)):
            q=Fte[i].permute(1,2,0).reshape(-1,Fte.shape[1]); out.append(torch.cdist(q,mem).amin(1).view(1,1,Fte.shape[2],Fte.shape[3]))
        return torch.cat(out)
    for norm in ['imagenet','inception']:
        if norm=='imagenet': B.INCEPTION_MEAN=(0.485,0.456,0.406); B.INCEPTION_STD=(0.229,0.224,0.225)
        ft=FeatureTokenizer(BackboneConfig(stride=16),SIZE); ft.load_source_weights()
        if norm=='imagenet': print(ft.in_mean.flatten())
        with torch.no_grad():
            f={k:torch.cat([ft.raw_features(C[k][i:i+16]) for i in range(0,len(C[k]),16)]) for k in ('Xtr','Xho','Xte')}
        cm=knn_maps(f['Xtr'],f['Xte']); m=to_map(cm); metrics(m,m.flatten(1).amax(1),f'{norm} 160 train')
        cm=knn_maps(torch.cat([f['Xtr'],f['Xho']]),f['Xte']); m=to_map(cm); metrics(m,m.flatten(1).amax(1),f'{norm} 200 train')
        B.INCEPTION_MEAN=(0.5,)*3; B.INCEPTION_STD=(0.5,)*3
elif CMD == 'train':
    import argparse, yaml
    from mae_ad.config import apply_overrides
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer, normal_statistics
    from mae_ad.train import lr_at, param_groups
    ap=argparse.ArgumentParser(); ap.add_argument('--minutes',type=float,default=3); ap.add_argument('--set',action='append',default=[]); ap.add_argument('--tag',default='')
    ap.add_argument('--size',type=int,default=224)
    a=ap.parse_args(sys.argv[3:])
    base={'model':{'preset':'tiny-p8','img_size':SIZE,'patch_size':1,'depth':4,'decoder_depth':2,'decoder_embed_dim':128,'decoder_num_heads':4,'lora':{'rank':0},
          'backbone':{'name':'efficientnet_lite0','layers':[2,3],'stride':16,'local':3}},'scoring':{'pattern':'grid'},
          'train':{'batch_size':16,'blr':1.5e-3,'mask_mode':'random','warmup_epochs':2}}
    cfg=config_from_dict(apply_overrides(base,a.set),'study')
    bb=cfg.model.backbone
    f=feats(tuple(bb.layers),bb.stride,bb.local,bb.name)
    torch.manual_seed(cfg.train.seed)
    model=build_model(cfg.model)
    mu=f['Xtr'].mean((0,2,3),keepdim=True); sd=f['Xtr'].std((0,2,3),keepdim=True)
    model.backbone.feat_mean.copy_(mu); model.backbone.feat_std.copy_(sd)
    T=(f['Xtr']-mu)/sd; Tho=(f['Xho']-mu)/sd; Tte=(f['Xte']-mu)/sd
    tc=cfg.train; bs=tc.batch_size
    lr0=tc.lr or tc.blr*bs/256
    opt=torch.optim.AdamW(param_groups(model,tc.weight_decay),lr=lr0,betas=tc.betas)
    spe=math.ceil(len(T)/bs); warm=tc.warmup_epochs*spe
    t0=time.time(); step=0; g=torch.Generator().manual_seed(0); budget=a.minutes*60
    est_total=None; losses=[]
    model.train()
    while time.time()-t0<budget:
        perm=torch.randperm(len(T),generator=g)
        for i in range(0,len(T),bs):
            x=T[perm[i:i+bs]]
            frac=(time.time()-t0)/budget
            lr=lr_at(warm+frac*1000 if step>=warm else step, int(warm+1000), warm, lr0, 0.0)
            for gr in opt.param_groups: gr['lr']=lr
            loss,_,_=model(x,tc.mask_ratio,g,mask_mode=tc.mask_mode)
            opt.zero_grad(); loss.backward(); opt.step(); step+=1; losses.append(loss.item())
            if time.time()-t0>budget: break
    model.eval()
    sc=Scorer(model, cfg.scoring, cfg.data).eval()
    with torch.no_grad():
        def raw(Tk): return torch.cat([sc._raw_map(Tk[i:i+16]) for i in range(0,len(Tk),16)])
        mte=raw(Tte)
        r=metrics(mte, mte.flatten(1).amax(1), f'{a.tag} raw steps={step} loss={np.mean(losses[-20:]):.3f}')
        if cfg.scoring.normalize=='position':
            mtr=raw(T); mean,std=normal_statistics(mtr,0.1,1e-6)
            z=(mte-mean)/std; metrics(z,z.flatten(1).amax(1),f'{a.tag} pos-norm(train)')
    torch.save(dict(model=model.state_dict(),cfg=cfg.to_dict()),str(RUNS / f'fmae_{a.tag or "x"}.pt'))
elif CMD == 'fuse':
    from mae_ad.model import build_model
    from mae_ad.scoring import Scorer, normal_statistics
    tag=sys.argv[3]
    ck=torch.load(str(RUNS / f"fmae_{tag}.pt"), weights_only=True); cfg=config_from_dict(ck['cfg'],'x')
    model=build_model(cfg.model); model.load_state_dict(ck['model']); model.eval()
    bb=cfg.model.backbone; f=feats(tuple(bb.layers),bb.stride,bb.local,bb.name)
    mu=model.backbone.feat_mean; sd=model.backbone.feat_std
    T=(f['Xtr']-mu)/sd; Tte=(f['Xte']-mu)/sd
    sc=Scorer(model, cfg.scoring, cfg.data).eval()
    def raw(Tk): return torch.cat([sc._raw_map(Tk[i:i+16]) for i in range(0,len(Tk),16)])
    with torch.no_grad():
        Rtr=raw(T); Rte=raw(Tte)
    def knn(Fm, Fq, space):
        mem=Fm.permute(0,2,3,1).reshape(-1,Fm.shape[1]); out=[]
        for i in range(len(Fq)):
            q=Fq[i].permute(1,2,0).reshape(-1,Fq.shape[1]); out.append(torch.cdist(q,mem).amin(1).view(1,1,Fq.shape[2],Fq.shape[3]))
        return to_map(torch.cat(out))
    # leave-one-out kNN maps for train (for position stats): use memory without own image -> approximate by splitting halves
    def knn_train(Fm):
        h=len(Fm)//2; a=knn(Fm[h:],Fm[:h],0); b=knn(Fm[:h],Fm[h:],0); return torch.cat([a,b])
    def show(m,t): metrics(m,m.flatten(1).amax(1),t)
    mR,sR=normal_statistics(Rtr,0.1,1e-6); Rz=(Rte-mR)/sR
    show(Rz,'recon posnorm')
    for space,(A,B) in {'std':(T,Tte),'raw':(f['Xtr'],f['Xte'])}.items():
        Nte=knn(A,B,space); show(Nte,f'knn {space}')
        Ntr=knn_train(A); mN,sN=normal_statistics(Ntr,0.1,1e-6); Nz=(Nte-mN)/sN; show(Nz,f'knn {space} posnorm(half-LOO)')
        gN=Ntr.mean(); gs=Ntr.std(); Ng=(Nte-gN)/gs
        for w in (0.5,1,2):
            show(Rz+w*Nz,f'fuse Rz+{w}*Nz {space}')
        gR=Rtr.mean(); gRs=Rtr.std()
        show((Rte-gR)/gRs+(Nte-gN)/gs, f'fuse global-z {space}')
        show(Rz*0+ (Rte/gR)*(Nte/gN), f'product {space}')
